"""After training: measure the exported model and write training_report.json and the model card
(README.md) generated from it.

Everything in the report is measured on the exported folder as zili loads it (fp32 compute), so
the card's perplexity is what `folder_perplexity(folder, heldout.txt)` gives back.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from zili.train.checkpoint import write_json
from zili.train.evaluate import folder_perplexity
from zili.train.presets import TrainConfig

SAMPLE_MAX_TOKENS = 60
SAMPLE_SEED = 0
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_P = 0.95
PERPLEXITY_METHOD = (
    "heldout.txt tokenized without special tokens, cut into non-overlapping windows of "
    "max_position_embeddings tokens (stride = window; a last shorter window counts if it has >= 2 "
    "tokens), each window scored on its own; perplexity = exp(sum of NLL / predicted tokens), "
    "a window of n tokens predicting its last n - 1; fp32 compute on the stored weights")


def count_parameters(config: TrainConfig) -> dict[str, int]:
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h  # q, o, k, v, gate/up/down, two norms
    embedding = config.vocab_size * h
    return {"total": embedding + layers * per_layer + h, "embedding": embedding,
            "non_embedding": layers * per_layer + h}


def generate_samples(folder: Path, prompts: tuple[str, ...]) -> list[dict]:
    if not prompts:
        return []
    from zili.llm import LLM
    from zili.sampling_params import SamplingParams

    llm = LLM(folder, device="cpu", dtype=torch.float32, kv_cache_memory="64MiB")  # a few short samples
    params = SamplingParams(temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, seed=SAMPLE_SEED,
                            max_tokens=SAMPLE_MAX_TOKENS)
    return [{"prompt": prompt, "completion": llm.generate(prompt, params, use_tqdm=False)[0].text} for prompt in prompts]


def write_report(out: Path, opts, config: TrainConfig, state: dict, world_size: int,
                 autocast_dtype: torch.dtype | None, device: str) -> dict:
    val_text = (out / "heldout.txt").read_text()
    ppl, nll, predicted = folder_perplexity(out, val_text)
    params = count_parameters(config)
    report = {
        "name": out.name,
        "architecture": "LlamaForCausalLM",
        "parameters": params,
        "config": config.to_dict(),
        "training": {
            "steps": state["step"],
            "tokens": state["tokens"],
            "time_s": round(state["elapsed_s"], 1),
            "tokens_per_s": round(state["tokens"] / max(state["elapsed_s"], 1e-9), 1),
            "processes": world_size,
            "threads_per_process": torch.get_num_threads(),
            "device": device,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "precision": "bf16 autocast" if autocast_dtype is not None else "fp32",
            "final_train_loss": state["history"][-1]["loss"] if state["history"] else None,
            "torch": torch.__version__,
        },
        "validation": {"perplexity": ppl, "nll": nll, "predicted_tokens": predicted,
                       "heldout_chars": len(val_text), "method": PERPLEXITY_METHOD},
        "val_history": state["val_history"],
        "samples": generate_samples(out, tuple(opts.sample_prompts)),
        "data": Path(opts.data_card).read_text().strip() if opts.data_card else None,
        "command": opts.command,
    }
    write_json(out / "training_report.json", report)
    (out / "README.md").write_text(model_card(report))
    return report


def model_card(report: dict) -> str:
    """The model card's markdown, generated from training_report.json's contents."""
    cfg, training, val = report["config"], report["training"], report["validation"]
    params = report["parameters"]
    minutes = training["time_s"] / 60
    curve = "\n".join(f"| {v['step']} | {v['loss']:.4f} | {v['perplexity']:.2f} |" for v in report["val_history"])
    samples = "\n\n".join(f"**Prompt** `{s['prompt']}`\n\n```text\n{s['prompt']}{s['completion']}\n```"
                          for s in report["samples"])
    command = f"```sh\n{report['command']}\n```" if report["command"] else "(not recorded)"
    usage = ('zili generate "To be, or not to be"      # the default model' if report["name"] == "zili-demo"
             else f'zili generate path/to/{report["name"]} "Once upon a time"')
    same_length = ""
    if report["command"] and "--time-budget" in report["command"]:
        same_length = (f"\n`--time-budget` fits the step count to the measured speed, so it differs between "
                       f"machines; for a run of this one's length, replace it with `--max-steps {training['steps']}`.")
    return f"""# {report['name']}

A small Llama-architecture language model trained from scratch by `zili train` on one machine.
It is a plain language model (it continues text); the chat template in `tokenizer_config.json`
(ChatML-like `<|im_start|>` / `<|im_end|>` markers) only gives chat front-ends a consistent prompt,
the model was never trained on conversations.

```sh
{usage}
```

## Model

| | |
|---|---|
| architecture | LlamaForCausalLM (RMSNorm, RoPE, SwiGLU, GQA, tied embeddings) |
| parameters | {params['total']:,} ({params['non_embedding']:,} without the embedding) |
| layers / hidden / intermediate | {cfg['num_hidden_layers']} / {cfg['hidden_size']} / {cfg['intermediate_size']} |
| attention heads / KV heads | {cfg['num_attention_heads']} / {cfg['num_key_value_heads']} |
| context | {cfg['context_length']} tokens |
| tokenizer | byte-level BPE, {cfg['vocab_size']:,} tokens, trained on the same corpus |

## Data

{report['data'] or 'Not described.'}

## Training

| | |
|---|---|
| steps | {training['steps']:,} ({cfg['batch_size']} x {cfg['grad_accum']} sequences of {cfg['context_length']} tokens per step and process) |
| tokens | {training['tokens']:,} |
| optimizer | AdamW, peak lr {cfg['lr']}, {cfg['warmup_steps']} warmup steps, cosine to {cfg['lr'] * cfg['min_lr_ratio']:.1e}, weight decay {cfg['weight_decay']} |
| precision | {training['precision']} |
| time | {minutes:.1f} minutes, {training['tokens_per_s']:,.0f} tokens/s |
| hardware | {training['processes']} process(es) x {training['threads_per_process']} thread(s) on {training['cpu_count']} CPU cores ({training['cpu']}), torch {training['torch']} |

| step | validation loss | perplexity |
|---|---|---|
{curve}

## Evaluation

Validation perplexity: **{val['perplexity']:.2f}** (mean NLL {val['nll']:.4f} nats over {val['predicted_tokens']:,}
predicted tokens of `heldout.txt`).

Method: {val['method']}.

## Samples

Temperature {SAMPLE_TEMPERATURE}, top-p {SAMPLE_TOP_P}, seed {SAMPLE_SEED}, {SAMPLE_MAX_TOKENS} tokens:

{samples}

## Reproduce

{command}
{same_length} Results vary slightly with hardware and thread count.
"""


def main(argv: list[str] | None = None) -> int:
    """`python -m zili.train.report FOLDER`: re-render README.md from training_report.json."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    report = json.loads((args.folder / "training_report.json").read_text())
    (args.folder / "README.md").write_text(model_card(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
