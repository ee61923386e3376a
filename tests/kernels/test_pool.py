"""The kernels' worker pool (cpu/pool.cpp): chunks claimed by whichever thread comes, so every result
must be the same whatever the thread count, the callers and the process (fork). Oracles: the same op
on one thread (bitwise), and fp64 matmuls (test_dense's bound)."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_dense import assert_within_bound, bf16_case
from test_quant_kernels import KERNELS, random_weight


def quantized(n: int, k: int, bits: int, group_size: int):
    kernel = KERNELS[bits](random_weight(bits, n, k, group_size, symmetric=False))
    return kernel.weight, kernel.scales, kernel.zero_scales, 0.0, bits, group_size  # the ops' arguments


def results(ops, x, w, b, qweights):
    out = [ops.linear_bf16(x, w, b)]
    for packed in qweights:
        out.append(ops.linear_quant(x, *packed, b))
        out.append(ops.dequantize(*packed, 5, 300, torch.bfloat16))
    return out


# n: the pool's last chunks shrink (to 32 rows) as the work runs out; 1003 and 4881 end in odd tails
@pytest.mark.parametrize("m,n", [(1, 1003), (5, 1003), (16, 1003), (40, 1003), (1, 4881), (16, 4881)])
def test_results_do_not_depend_on_the_thread_count(cpu_kernels, m, n):
    ops = torch.ops.zili_cpu
    x, w, b = bf16_case(m, 896, n, seed=m)
    qweights = [quantized(n, 896, 8, 64), quantized(n, 896, 4, 32)]
    threads = torch.get_num_threads()
    try:
        runs = {}
        for count in (1, 2, 3, 4, 2):  # 3 and 4 oversubscribe this machine; the pool resizes each time
            torch.set_num_threads(count)
            runs[count] = results(ops, x, w, b, qweights)
    finally:
        torch.set_num_threads(threads)
    for count, outputs in runs.items():
        assert all(torch.equal(a, e) for a, e in zip(outputs, runs[1])), f"{count} threads differ from one"
    assert_within_bound(runs[2][0], x, w, b, rounded_output=True)


def test_concurrent_callers_each_get_their_own_result(cpu_kernels):
    """Callers on other threads while a job runs compute inline; nobody sees another caller's rows."""
    ops = torch.ops.zili_cpu
    cases = [bf16_case(16, 896, 1152, seed=s) for s in range(4)]
    expected = [ops.linear_bf16(x, w, b) for x, w, b in cases]
    failures = []

    def caller(index):
        x, w, b = cases[index]
        for _ in range(25):
            if not torch.equal(ops.linear_bf16(x, w, b), expected[index]):
                failures.append(index)

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in workers), "a caller hung"
    assert failures == []


CHILD_SCRIPT = """
import os, sys, torch
from zili.kernels import cpu_ext
assert cpu_ext.available()
torch.set_num_threads(2)
torch.manual_seed(0)
x, w = torch.randn(8, 896).bfloat16(), torch.randn(2000, 896).bfloat16()
ops = torch.ops.zili_cpu
first = ops.linear_bf16(x, w, None)               # starts the pool
for _ in range(300):                              # ZILI_CPU_SPIN_US=0: every call wakes a sleeping worker
    assert torch.equal(ops.linear_bf16(x, w, None), first)
pid = os.fork()
if pid == 0:                                      # the child has none of the parent's threads
    ok = all(torch.equal(ops.linear_bf16(x, w, None), first) for _ in range(20))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
assert torch.equal(ops.linear_bf16(x, w, None), first)
print("ok")
"""


def test_sleeping_workers_wake_and_a_forked_child_has_its_own_pool(cpu_kernels):
    repo = str(Path(cpu_kernels.__file__).resolve().parents[2])
    env = dict(os.environ, ZILI_CPU_SPIN_US="0", PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CHILD_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"
