// The decoder layer's elementwise work on bf16 rows, one pass each, with the Llama modules' roundings (see
// cpu_kernels.py). PyTorch runs each of these as 3-8 separate operations; in a decode step of 160 rows each
// operation costs more in dispatch than in arithmetic, and in a prefill each is a pass over memory.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

inline __m512 load16(const at::BFloat16* p) {  // 16 bf16 -> fp32, exact
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 round16(__m512 x) {  // fp32 -> nearest bf16 (ties to even), back in fp32: PyTorch's rounding
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

inline void store16(at::BFloat16* p, __m512 x) {  // fp32 -> bf16, round to nearest even
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.size(1) % 16 == 0,
              name, ": (rows, width) bf16, contiguous, width a multiple of 16");
}

// out = weight * bf16(x * rsqrt(mean(x^2) + eps)), x in fp32 (LlamaRMSNorm on bf16 inputs)
void rms_row(const at::BFloat16* x, const at::BFloat16* weight, at::BFloat16* out, int64_t width, float eps) {
  __m512 sq = _mm512_setzero_ps();
  for (int64_t j = 0; j < width; j += 16) {
    const __m512 v = load16(x + j);
    sq = _mm512_fmadd_ps(v, v, sq);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) / width + eps));
  for (int64_t j = 0; j < width; j += 16)
    store16(out + j, _mm512_mul_ps(load16(weight + j), round16(_mm512_mul_ps(load16(x + j), inv))));
}

}  // namespace

// rms_norm(x (R, D) bf16, weight (D,) bf16, eps) -> (R, D) bf16
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == at::kBFloat16 &&
              weight.is_contiguous(), "weight: (D,) bf16");
  auto out = torch::empty_like(x);
  const int64_t D = x.size(1);
  const at::BFloat16 *xd = x.data_ptr<at::BFloat16>(), *wd = weight.data_ptr<at::BFloat16>();
  at::BFloat16* od = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_row(xd + r * D, wd, od + r * D, D, static_cast<float>(eps));
  });
  return out;
}

// add_rms_norm(x, y, weight, eps): x += y in place (rounded to bf16, as x + y is), returns rms_norm(x)
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor y, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  check_rows(y, "y");
  TORCH_CHECK(x.sizes() == y.sizes(), "x and y: the same shape");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == at::kBFloat16 &&
              weight.is_contiguous(), "weight: (D,) bf16");
  auto out = torch::empty_like(x);
  const int64_t D = x.size(1);
  at::BFloat16 *xd = x.data_ptr<at::BFloat16>(), *od = out.data_ptr<at::BFloat16>();
  const at::BFloat16 *yd = y.data_ptr<at::BFloat16>(), *wd = weight.data_ptr<at::BFloat16>();
  at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      at::BFloat16* row = xd + r * D;
      for (int64_t j = 0; j < D; j += 16) store16(row + j, _mm512_add_ps(load16(row + j), load16(yd + r * D + j)));
      rms_row(row, wd, od + r * D, D, static_cast<float>(eps));
    }
  });
  return out;
}

// silu_mul(gate_up (R, 2F) bf16) -> (R, F) bf16: bf16(bf16(silu(gate)) * up), gate the first F columns
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t R = gate_up.size(0), F = gate_up.size(1) / 2;
  TORCH_CHECK(F % 16 == 0, "gate_up: width a multiple of 32");
  auto out = torch::empty({R, F}, gate_up.options());
  const at::BFloat16* gd = gate_up.data_ptr<at::BFloat16>();
  at::BFloat16* od = out.data_ptr<at::BFloat16>();
  using Vec = at::vec::Vectorized<float>;
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < F; j += 16) {
        const __m512 g = load16(gd + r * 2 * F + j), u = load16(gd + r * 2 * F + F + j);
        const __m512 e = __m512(Vec(_mm512_sub_ps(_mm512_setzero_ps(), g)).exp_u20());
        const __m512 silu = round16(_mm512_div_ps(g, _mm512_add_ps(one, e)));
        store16(od + r * F + j, _mm512_mul_ps(silu, u));
      }
  });
  return out;
}

// rotary_(qkv (R, heads_total * d) bf16, cos (R, d), sin (R, d), heads): rotates the first ``heads`` heads of each
// row in place, rotate-half convention: bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), as the model does in bf16
void rotary_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads) {
  check_rows(qkv, "qkv");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  const int64_t R = qkv.size(0), d = cos.size(1), half = d / 2;
  TORCH_CHECK(cos.size(0) == R && sin.sizes() == cos.sizes() && half % 16 == 0 && heads * d <= qkv.size(1),
              "cos, sin: (rows, d), d a multiple of 32; heads * d within qkv's width");
  at::BFloat16* xd = qkv.data_ptr<at::BFloat16>();
  const at::BFloat16 *cd = cos.data_ptr<at::BFloat16>(), *sd = sin.data_ptr<at::BFloat16>();
  const int64_t W = qkv.size(1);
  at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t h = 0; h < heads; ++h) {
        at::BFloat16* x = xd + r * W + h * d;
        for (int64_t j = 0; j < half; j += 16) {
          const __m512 x1 = load16(x + j), x2 = load16(x + half + j);
          const __m512 c1 = load16(cd + r * d + j), c2 = load16(cd + r * d + half + j);
          const __m512 s1 = load16(sd + r * d + j), s2 = load16(sd + r * d + half + j);
          // first half: x1 cos1 + (-x2) sin1; second half: x2 cos2 + x1 sin2
          const __m512 a = _mm512_add_ps(round16(_mm512_mul_ps(x1, c1)), round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1)));
          const __m512 b = _mm512_add_ps(round16(_mm512_mul_ps(x2, c2)), round16(_mm512_mul_ps(x1, s2)));
          store16(x + j, a);
          store16(x + half + j, b);
        }
      }
  });
}

// Top-p sampling's two passes over the vocabulary (sampler.py), each row's in one pass while it sits in cache:
// PyTorch's copy, division, max, subtraction, exp and block sums (or division, threshold and sum) each stream
// the whole (rows x 49k) fp32 buffer through memory.

// nucleus_weights(logits (A, B, V): any strides but the last, fp32 or bf16; temperature; weights (A B, V) fp32,
// written: exp(x / temperature - max)) -> (A B, ceil(V / block)) fp32, each block of ``block`` tokens' sum
torch::Tensor nucleus_weights(torch::Tensor logits, double temperature, torch::Tensor weights, int64_t block) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1 &&
              (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "logits: (A, B, V) fp32 or bf16, the last dim contiguous");
  const int64_t A = logits.size(0), B = logits.size(1), V = logits.size(2), R = A * B;
  TORCH_CHECK(weights.sizes() == at::IntArrayRef({R, V}) && weights.scalar_type() == at::kFloat && weights.is_contiguous(),
              "weights: (A B, V) fp32, contiguous");
  TORCH_CHECK(block >= 16 && block % 16 == 0 && temperature > 0, "block: a multiple of 16; temperature > 0");
  const int64_t blocks = (V + block - 1) / block;
  auto sums = torch::empty({R, blocks}, weights.options());
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  const char* base = static_cast<const char*>(logits.data_ptr());
  const int64_t item = logits.element_size(), s0 = logits.stride(0), s1 = logits.stride(1);
  float* wd = weights.data_ptr<float>();
  float* sd = sums.data_ptr<float>();
  const bool scaled = temperature != 1.0;
  using Vec = at::vec::Vectorized<float>;
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const char* row = base + ((r / B) * s0 + (r % B) * s1) * item;
      float* w = wd + r * V;
      const int64_t full = V / 16 * 16;
      __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < full; j += 16) {  // the row in fp32 (divided by the temperature), and its max
        __m512 x = bf16 ? load16(reinterpret_cast<const at::BFloat16*>(row) + j) : _mm512_loadu_ps(reinterpret_cast<const float*>(row) + j);
        if (scaled) x = _mm512_div_ps(x, _mm512_set1_ps(static_cast<float>(temperature)));
        _mm512_storeu_ps(w + j, x);
        vmax = _mm512_max_ps(vmax, x);
      }
      float mx = _mm512_reduce_max_ps(vmax);
      for (int64_t j = full; j < V; ++j) {
        float x = bf16 ? static_cast<float>(reinterpret_cast<const at::BFloat16*>(row)[j]) : reinterpret_cast<const float*>(row)[j];
        w[j] = scaled ? x / static_cast<float>(temperature) : x;
        mx = std::max(mx, w[j]);
      }
      const Vec vm(mx);
      for (int64_t k = 0; k < blocks; ++k) {  // exp(x - max) in place, summed per block
        const int64_t lo = k * block, hi = std::min(V, lo + block);
        Vec acc(0.f);
        int64_t j = lo;
        for (; j + 16 <= hi; j += 16) {
          const Vec e = (Vec::loadu(w + j) - vm).exp_u20();
          e.store(w + j);
          acc = acc + e;
        }
        float total = _mm512_reduce_add_ps(__m512(acc));
        for (; j < hi; ++j) total += (w[j] = std::exp(w[j] - mx));
        sd[r * blocks + k] = total;
      }
    }
  });
  return sums;
}

// mass_from(weights (R, V) fp32, p (R, 1) fp32, strict) -> (R,): each row's total weight of tokens with weight >= p
// (> p when strict)
torch::Tensor mass_from(torch::Tensor weights, torch::Tensor p, bool strict) {
  TORCH_CHECK(weights.dim() == 2 && weights.scalar_type() == at::kFloat && weights.is_contiguous(), "weights: (R, V) fp32, contiguous");
  const int64_t R = weights.size(0), V = weights.size(1);
  TORCH_CHECK(p.numel() == R && p.scalar_type() == at::kFloat && p.is_contiguous(), "p: (R, 1) fp32");
  auto out = torch::empty({R}, weights.options());
  const float *wd = weights.data_ptr<float>(), *pd = p.data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* w = wd + r * V;
      const __m512 vp = _mm512_set1_ps(pd[r]);
      __m512 acc = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 16 <= V; j += 16) {
        const __m512 x = _mm512_loadu_ps(w + j);
        const __mmask16 keep = strict ? _mm512_cmp_ps_mask(x, vp, _CMP_GT_OQ) : _mm512_cmp_ps_mask(x, vp, _CMP_GE_OQ);
        acc = _mm512_mask_add_ps(acc, keep, acc, x);
      }
      float total = _mm512_reduce_add_ps(acc);
      for (; j < V; ++j)
        if (strict ? w[j] > pd[r] : w[j] >= pd[r]) total += w[j];
      od[r] = total;
    }
  });
  return out;
}
