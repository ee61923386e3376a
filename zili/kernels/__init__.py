"""zili's own compute kernels; PyTorch's paths stay the fallback and the test oracle."""
