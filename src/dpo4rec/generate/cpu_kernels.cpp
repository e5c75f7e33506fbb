// One Python module for the sampler's CPU kernels (cpu_kernels.py): the attention over shared prompt caches
// (prefix_attention.cpp), the decoder layer's fused elementwise work and top-p sampling's passes (fused_ops.cpp).
#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor lengths,
                                     double scale, torch::Tensor suffix_keys, torch::Tensor suffix_values,
                                     int64_t suffix_len, int64_t group);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor y, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rotary_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads);
torch::Tensor nucleus_weights(torch::Tensor logits, double temperature, torch::Tensor weights, int64_t block);
torch::Tensor mass_from(torch::Tensor weights, torch::Tensor p, bool strict);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention", &attention, "attention over shared prompt caches (AVX512-BF16)");
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows, LlamaRMSNorm's roundings");
  m.def("add_rms_norm", &add_rms_norm, "x += y in place, then RMSNorm of x");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of bf16 rows holding [gate, up]");
  m.def("rotary_", &rotary_, "rotary embedding, in place, of the first heads of each bf16 row");
  m.def("nucleus_weights", &nucleus_weights, "top-p sampling's weights exp(x / t - max) and their block sums");
  m.def("mass_from", &mass_from, "each row's total weight at or above (above) p");
}
