// Decode-step attention over a user's shared prompt cache, for CPUs with AVX512-BF16 (see prefix_kernel.py).
//
// Each (user, KV head) has M queries (the user's rows times the query heads of the group) and one prompt cache.
// Scores are bf16 x bf16 products summed in fp32 (vdpbf16ps), the softmax and the probabilities x values
// stay in fp32: PyTorch's fused CPU kernel rounds the probabilities to bf16 before they meet the values.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kHead = 64;  // head dimension: the value pass keeps one row of 64 in four registers

inline __m512 load_bf16(const at::BFloat16* p) {  // 16 bf16 -> fp32, exact
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Scaled scores of QN queries against keys [0, width): QN x 32 keys of accumulators at a time.
// q: QN rows of d/2 bf16 pairs; keys: (d/2, Pp, 2), each key's dims in pairs as vdpbf16ps reads them.
template <int QN>
void scores_block(const uint32_t* q, const at::BFloat16* keys, float* out, int64_t width, int64_t Pp, float scale) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < width; j += 32) {
    __m512 acc[QN][2];
#pragma GCC unroll 8
    for (int i = 0; i < QN; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < kHead / 2; ++c) {
      const at::BFloat16* row = keys + (c * Pp + j) * 2;
      __m512bh k0 = (__m512bh)_mm512_loadu_si512(row), k1 = (__m512bh)_mm512_loadu_si512(row + 32);
#pragma GCC unroll 8
      for (int i = 0; i < QN; ++i) {
        __m512bh qv = (__m512bh)_mm512_set1_epi32(q[i * kHead / 2 + c]);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], qv, k0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], qv, k1);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < QN; ++i) {
      _mm512_storeu_ps(out + i * Pp + j, _mm512_mul_ps(acc[i][0], vscale));
      _mm512_storeu_ps(out + i * Pp + j + 16, _mm512_mul_ps(acc[i][1], vscale));
    }
  }
}

// Softmax numerators exp(s - max) of one row in place over [0, width) (keys from len on get 0); returns
// {max, sum of the numerators}.
std::pair<float, float> softmax_row(float* s, int64_t len, int64_t width) {
  using Vec = at::vec::Vectorized<float>;
  for (int64_t j = len; j < width; ++j) s[j] = -std::numeric_limits<float>::infinity();
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < width; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  const float mx = _mm512_reduce_max_ps(vmax);
  Vec vm(mx), vsum(0.f);
  for (int64_t j = 0; j < width; j += 16) {
    Vec e = (Vec::loadu(s + j) - vm).exp_u20();
    e.store(s + j);
    vsum = vsum + e;
  }
  return {mx, _mm512_reduce_add_ps(__m512(vsum))};
}

}  // namespace

// q: (B, M, 64) bf16; keys: (B, 32, Pp, 2) bf16, Pp % 32 == 0; values: (B, Pp, 64) bf16; lengths: (B,) int64,
// 1 <= length <= Pp (keys from length on are padding). Returns out (B, M, 64) fp32 and lse (B, M) fp32.
std::vector<torch::Tensor> prefix_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values,
                                            torch::Tensor lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kHead && q.scalar_type() == at::kBFloat16 && q.is_contiguous(), "q: (B, M, 64) bf16");
  const int64_t B = q.size(0), M = q.size(1), Pp = keys.size(2);
  TORCH_CHECK(keys.sizes() == at::IntArrayRef({B, kHead / 2, Pp, 2}) && Pp % 32 == 0 && keys.is_contiguous() &&
              keys.scalar_type() == at::kBFloat16, "keys: (B, 32, Pp, 2) bf16, Pp a multiple of 32");
  TORCH_CHECK(values.sizes() == at::IntArrayRef({B, Pp, kHead}) && values.is_contiguous() &&
              values.scalar_type() == at::kBFloat16, "values: (B, Pp, 64) bf16");
  TORCH_CHECK(lengths.sizes() == at::IntArrayRef({B}) && lengths.scalar_type() == at::kLong, "lengths: (B,) int64");
  const int64_t* len_data = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(len_data[b] >= 1 && len_data[b] <= Pp, "lengths in [1, Pp]");
  auto out = torch::empty({B, M, kHead}, q.options().dtype(at::kFloat));
  auto lse = torch::empty({B, M}, q.options().dtype(at::kFloat));
  const uint32_t* q_data = reinterpret_cast<const uint32_t*>(q.data_ptr<at::BFloat16>());  // bf16 pairs
  const at::BFloat16* k_data = keys.data_ptr<at::BFloat16>();
  const at::BFloat16* v_data = values.data_ptr<at::BFloat16>();
  float* out_data = out.data_ptr<float>();
  float* lse_data = lse.data_ptr<float>();
  const int64_t Mp = (M + 3) / 4 * 4;  // queries padded to whole blocks of 4 (zero rows, never written out)
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> qbuf(Mp * kHead / 2, 0);
    std::vector<float> scores(Mp * Pp), inv(Mp);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = len_data[b], width = (len + 31) / 32 * 32;
      std::memcpy(qbuf.data(), q_data + b * M * kHead / 2, M * kHead / 2 * sizeof(uint32_t));
      const at::BFloat16* kb = k_data + b * kHead * Pp;
      const at::BFloat16* vb = v_data + b * Pp * kHead;
      int64_t i0 = 0;
      for (; i0 + 8 <= Mp; i0 += 8) scores_block<8>(qbuf.data() + i0 * kHead / 2, kb, scores.data() + i0 * Pp, width, Pp, fscale);
      for (; i0 < Mp; i0 += 4) scores_block<4>(qbuf.data() + i0 * kHead / 2, kb, scores.data() + i0 * Pp, width, Pp, fscale);
      for (int64_t i = 0; i < Mp; ++i) {
        const auto [mx, sum] = softmax_row(scores.data() + i * Pp, len, width);
        if (i < M) lse_data[b * M + i] = mx + std::log(sum);
        inv[i] = 1.f / sum;
      }
      // out = sum_j p_j v_j / sum_j p_j: 4 queries x 64 dims of accumulators, p in fp32
      for (int64_t r = 0; r < Mp; r += 4) {
        __m512 acc[4][4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; ++j) {
          const at::BFloat16* vr = vb + j * kHead;
          __m512 v0 = load_bf16(vr), v1 = load_bf16(vr + 16), v2 = load_bf16(vr + 32), v3 = load_bf16(vr + 48);
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) {
            __m512 p = _mm512_set1_ps(scores[(r + i) * Pp + j]);
            acc[i][0] = _mm512_fmadd_ps(p, v0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(p, v1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(p, v2, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(p, v3, acc[i][3]);
          }
        }
        for (int i = 0; i < 4 && r + i < M; ++i) {
          float* o = out_data + (b * M + r + i) * kHead;
          const __m512 w = _mm512_set1_ps(inv[r + i]);
          for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[i][c], w));
        }
      }
    }
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prefix_attention", &prefix_attention, "decode-step attention over shared prompt caches (AVX512-BF16)");
}
