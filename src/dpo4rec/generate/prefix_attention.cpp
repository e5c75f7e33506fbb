// Attention over a shared prompt cache for CPUs with AVX512-BF16 (see cpu_kernels.py): a decode step's
// queries against [the user's prompt, the row's own answer so far], or a prompt's own causal attention.
//
// Each (user, KV head) b has M queries and one prompt cache; query i sees the prompt's keys [0, lengths[b, i])
// and, in a decode step, the keys its row has written so far (query i belongs to row i / group). Prompt
// scores are bf16 x bf16 products summed in fp32 (vdpbf16ps); the softmax is fp32; the prompt's probabilities
// meet its values in bf16, summed in fp32 (vdpbf16ps again: the model's own attention also rounds them to bf16,
// and fp32 products there took twice as long); the rows' own keys and values and their part stay in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <cmath>
#include <algorithm>
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

float row_max(const float* s, int64_t width) {  // width: a multiple of 16
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < width; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  return _mm512_reduce_max_ps(vmax);
}

// exp(s - mx) in place over [0, width) (a multiple of 16); returns their sum.
float exp_row(float* s, int64_t width, float mx) {
  using Vec = at::vec::Vectorized<float>;
  Vec vm(mx), vsum(0.f);
  for (int64_t j = 0; j < width; j += 16) {
    Vec e = (Vec::loadu(s + j) - vm).exp_u20();
    e.store(s + j);
    vsum = vsum + e;
  }
  return _mm512_reduce_add_ps(__m512(vsum));
}

// Softmax numerators exp(s - max) of one prompt row in place over [0, width) (keys from len on get 0), the max
// taken with ``other`` (the row's own keys' largest score); returns {max, sum of this row's numerators}.
std::pair<float, float> softmax_row(float* s, int64_t len, int64_t width, float other) {
  for (int64_t j = len; j < width; ++j) s[j] = -std::numeric_limits<float>::infinity();
  const float mx = std::max(row_max(s, width), other);
  return {mx, exp_row(s, width, mx)};
}

// Scaled fp32 scores of one query (64 bf16) against its row's first ``len`` keys (len x 64 fp32); -inf up to width.
void suffix_scores(const uint32_t* q, const float* keys, float* out, int64_t len, int64_t width, float scale) {
  const at::BFloat16* qbf = reinterpret_cast<const at::BFloat16*>(q);
  const __m512 q0 = load_bf16(qbf), q1 = load_bf16(qbf + 16), q2 = load_bf16(qbf + 32), q3 = load_bf16(qbf + 48);
  for (int64_t j = 0; j < len; ++j) {
    const float* kj = keys + j * kHead;
    __m512 acc = _mm512_mul_ps(q0, _mm512_loadu_ps(kj));
    acc = _mm512_fmadd_ps(q1, _mm512_loadu_ps(kj + 16), acc);
    acc = _mm512_fmadd_ps(q2, _mm512_loadu_ps(kj + 32), acc);
    acc = _mm512_fmadd_ps(q3, _mm512_loadu_ps(kj + 48), acc);
    out[j] = _mm512_reduce_add_ps(acc) * scale;
  }
  for (int64_t j = len; j < width; ++j) out[j] = -std::numeric_limits<float>::infinity();
}

// out += scale * sum_j p_j v_j over a row's own ``len`` values (len x 64 fp32).
void add_suffix(float* out, const float* p, const float* values, int64_t len, float scale) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t j = 0; j < len; ++j) {
    const __m512 w = _mm512_set1_ps(p[j]);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(values + j * kHead + 16 * c), acc[c]);
  }
  const __m512 vscale = _mm512_set1_ps(scale);
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_fmadd_ps(acc[c], vscale, _mm512_loadu_ps(out + 16 * c)));
}

}  // namespace

// q: (B, M, 64) bf16; keys: (B, 32, Pp, 2) bf16, Pp % 32 == 0; values: (B, Pp / 2, 64, 2) bf16, each dim's values of
// two consecutive keys side by side; lengths: (B, M) int64,
// 1 <= length <= Pp. suffix_keys and suffix_values: (B, n, T, 64) fp32, each row's own keys and values, of which
// the first suffix_len are read (0: none, and the two may be empty); M == n * group then.
// Returns out (B, M, 64) fp32 (normalized) and lse (B, M) fp32 (over everything a query saw).
std::vector<torch::Tensor> attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor lengths,
                                     double scale, torch::Tensor suffix_keys, torch::Tensor suffix_values,
                                     int64_t suffix_len, int64_t group) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kHead && q.scalar_type() == at::kBFloat16 && q.is_contiguous(), "q: (B, M, 64) bf16");
  const int64_t B = q.size(0), M = q.size(1), Pp = keys.size(2);
  TORCH_CHECK(keys.sizes() == at::IntArrayRef({B, kHead / 2, Pp, 2}) && Pp % 32 == 0 && keys.is_contiguous() &&
              keys.scalar_type() == at::kBFloat16, "keys: (B, 32, Pp, 2) bf16, Pp a multiple of 32");
  TORCH_CHECK(values.sizes() == at::IntArrayRef({B, Pp / 2, kHead, 2}) && values.is_contiguous() &&
              values.scalar_type() == at::kBFloat16, "values: (B, Pp / 2, 64, 2) bf16");
  TORCH_CHECK(lengths.sizes() == at::IntArrayRef({B, M}) && lengths.scalar_type() == at::kLong && lengths.is_contiguous(),
              "lengths: (B, M) int64");
  const int64_t* len_data = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * M; ++i) TORCH_CHECK(len_data[i] >= 1 && len_data[i] <= Pp, "lengths in [1, Pp]");
  int64_t n = 0, T = 0;
  const float *sk_data = nullptr, *sv_data = nullptr;
  if (suffix_len > 0) {
    TORCH_CHECK(suffix_keys.dim() == 4 && group >= 1 && suffix_keys.size(0) == B && suffix_keys.size(1) * group == M &&
                suffix_keys.size(2) >= suffix_len && suffix_keys.size(3) == kHead && suffix_keys.is_contiguous() &&
                suffix_keys.scalar_type() == at::kFloat, "suffix_keys: (B, M / group, T >= suffix_len, 64) fp32");
    n = suffix_keys.size(1), T = suffix_keys.size(2);
    TORCH_CHECK(suffix_values.sizes() == at::IntArrayRef({B, n, T, kHead}) && suffix_values.is_contiguous() &&
                suffix_values.scalar_type() == at::kFloat, "suffix_values: (B, n, T, 64) fp32");
    sk_data = suffix_keys.data_ptr<float>();
    sv_data = suffix_values.data_ptr<float>();
  }
  auto out = torch::empty({B, M, kHead}, q.options().dtype(at::kFloat));
  auto lse = torch::empty({B, M}, q.options().dtype(at::kFloat));
  const uint32_t* q_data = reinterpret_cast<const uint32_t*>(q.data_ptr<at::BFloat16>());  // bf16 pairs
  const at::BFloat16* k_data = keys.data_ptr<at::BFloat16>();
  const at::BFloat16* v_data = values.data_ptr<at::BFloat16>();
  float* out_data = out.data_ptr<float>();
  float* lse_data = lse.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  // queries in chunks of up to kChunk: all their scores, then their softmax, then their pass over the values
  // (a decode step's M <= 33 is one chunk; a prompt's g x P queries are many)
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  const int64_t suffix_width = (suffix_len + 15) / 16 * 16;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> qbuf(kChunk * kHead / 2);
    std::vector<float> scores(kChunk * Pp), suffix(kChunk * std::max<int64_t>(suffix_width, 16)), inv(kChunk);
    std::vector<int64_t> len(kChunk);
    std::vector<at::BFloat16> probs(kChunk * Pp);  // the scores' softmax numerators, rounded to bf16
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, first = item % chunks * kChunk, rows = std::min(kChunk, M - first);
      const int64_t padded = (rows + 3) / 4 * 4;  // whole blocks of 4 (zero queries past ``rows``, never written out)
      std::fill(qbuf.begin(), qbuf.end(), 0u);
      std::memcpy(qbuf.data(), q_data + (b * M + first) * kHead / 2, rows * kHead / 2 * sizeof(uint32_t));
      for (int64_t i = 0; i < padded; ++i) len[i] = i < rows ? len_data[b * M + first + i] : 1;
      const at::BFloat16* kb = k_data + b * kHead * Pp;
      for (int64_t i0 = 0; i0 < padded;) {  // blocks of 8 queries (4 for the last), as far as their longest length
        const int64_t block = padded - i0 >= 8 ? 8 : 4;
        const int64_t longest = *std::max_element(len.begin() + i0, len.begin() + i0 + block);
        const int64_t width = (longest + 31) / 32 * 32;
        if (block == 8) scores_block<8>(qbuf.data() + i0 * kHead / 2, kb, scores.data() + i0 * Pp, width, Pp, fscale);
        else scores_block<4>(qbuf.data() + i0 * kHead / 2, kb, scores.data() + i0 * Pp, width, Pp, fscale);
        for (int64_t i = i0; i < i0 + block; ++i) {  // softmax numerators, with the row's own keys if any
          float* own = suffix.data() + i * suffix_width;
          const bool has_suffix = suffix_len > 0 && i < rows;
          if (has_suffix) suffix_scores(qbuf.data() + i * kHead / 2, sk_data + (b * n + (first + i) / group) * T * kHead,
                                        own, suffix_len, suffix_width, fscale);
          const float shift = has_suffix ? row_max(own, suffix_width) : -std::numeric_limits<float>::infinity();
          const auto [mx, sum] = softmax_row(scores.data() + i * Pp, len[i], width, shift);
          const float total = has_suffix ? sum + exp_row(own, suffix_width, mx) : sum;
          if (i < rows) lse_data[b * M + first + i] = mx + std::log(total);
          inv[i] = 1.f / total;
        }
        i0 += block;
      }
      // out = sum_j p_j v_j / sum_j p_j: pairs of keys' probabilities (bf16) x their values in vdpbf16ps, 4 queries
      // x 64 dims of fp32 accumulators; each query's probabilities as far as its block of 4 reads (0 past its length)
      for (int64_t i = 0; i < padded; ++i) {
        const int64_t b4 = i / 4 * 4;
        const int64_t width = (std::max({len[b4], len[b4 + 1], len[b4 + 2], len[b4 + 3]}) + 31) / 32 * 32;
        for (int64_t j = 0; j < width; j += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs.data() + i * Pp + j),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(scores.data() + i * Pp + j)));
      }
      const at::BFloat16* vb = v_data + b * Pp * kHead;
      for (int64_t r = 0; r < padded; r += 4) {
        __m512 acc[4][4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
        const int64_t pairs = (std::max({len[r], len[r + 1], len[r + 2], len[r + 3]}) + 1) / 2;
        const uint32_t* p_pairs = reinterpret_cast<const uint32_t*>(probs.data() + r * Pp);
        for (int64_t j = 0; j < pairs; ++j) {
          const at::BFloat16* vr = vb + j * kHead * 2;
          const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vr), v1 = (__m512bh)_mm512_loadu_si512(vr + 32),
                         v2 = (__m512bh)_mm512_loadu_si512(vr + 64), v3 = (__m512bh)_mm512_loadu_si512(vr + 96);
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) {
            const __m512bh p = (__m512bh)_mm512_set1_epi32(p_pairs[i * Pp / 2 + j]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], p, v0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], p, v1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], p, v2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], p, v3);
          }
        }
        for (int i = 0; i < 4 && r + i < rows; ++i) {
          float* o = out_data + (b * M + first + r + i) * kHead;
          const __m512 w = _mm512_set1_ps(inv[r + i]);
          for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[i][c], w));
        }
      }
      if (suffix_len > 0)  // apart from the loop above: indexing its accumulators here would keep them out of registers
        for (int64_t i = 0; i < rows; ++i)
          add_suffix(out_data + (b * M + first + i) * kHead, suffix.data() + i * suffix_width,
                     sv_data + (b * n + (first + i) / group) * T * kHead, suffix_len, inv[i]);
    }
  });
  return {out, lse};
}
