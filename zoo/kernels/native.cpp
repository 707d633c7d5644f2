// zoo's own CPU kernels: int8 and int4 weights times int8 activations, AVX-512 VNNI (native.py builds
// and loads this file; the formats and the math are described there).
//
//   zoo_native::int8_mm(x [M, K], qweight int8 [N, K], scales f32 [N]) -> y [M, N] in x's dtype
//   zoo_native::int4_mm(x [M, K], packed uint8 [N, Kp/2], scales f32 [N, Kp/G], scaled_zeros f32 [N, Kp/G],
//                       group_size G) -> y [M, N]
//   zoo_native::bf16_linear(x bf16 [M, K], weight bf16 [N, K], bias [N] or None) -> y bf16 [M, N]
//                       (no quantization: F.linear for a few rows, with AVX512-BF16; near the end of this file)
//   zoo_native::rotary(x [B, S, H, D], cos f32 [B or 1, S, 1, D'/2], sin, interleaved) -> x rotated
//                       (zoo/rotary.py's apply_rotary in one pass, the same operations; at the end)
//
// x (bf16 or fp32) is first quantized to int8 in blocks of 32 along K (quantize_rows): one fp32 scale
// per block, q = round(x * 127 / max|x|), and its rounding error, in a second int8, to 1/256 of a
// step. Then every dot product is integer within a block, VNNI's _mm512_dpbusd_epi32 (64 unsigned x
// signed byte products summed into 16 int32 lanes of 4), and fp32 across blocks. Kp is K rounded up to 128 (and to G); x's padding is zeros. The threads split the
// output rows (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;   // activation quantization block (llama.cpp's Q8_0 block)
constexpr int64_t CHUNK = 128;  // int4's chunk of K: 64 bytes, one load
constexpr int NR = 4;           // weight rows per tile: their dot products share each load of x
constexpr int MR = 2;           // rows of x per tile: they share each load (and unpacking) of the weight

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// 16 values of x from p (n of them, 1..16; the rest 0) as fp32
__m512 load16(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(n >= 16 ? 0xFFFF : (1u << n) - 1, p);
}
__m512 load16(const at::BFloat16* p, int64_t n) {  // bf16 is the top half of an fp32
  const __m256i h = _mm256_maskz_loadu_epi16(n >= 16 ? 0xFFFF : (1u << n) - 1, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Activations quantized in two int8 parts per block of 32 columns: x ~ scale * (q + r / 256), q =
// round(x / scale) and r = round(256 * (x / scale - q)), the rounding error of q in steps of 1/256
// (clamped to +-127). q and r are int8 [M, Kp] (zero past K; Kp = K rounded up to 128). The kernels
// take 256 * sum(w q) + sum(w r) as one int32 sum. `lanes` [M, Kp/64, 16] holds scale / 256 for each
// of VNNI's 16 int32 lanes of each 64 columns (lane l sums columns 4l..4l+3: lanes 0-7 the first
// block of 32, 8-15 the second). group_sum [M, Kp/G]: the sum of the quantized x over each group of
// G columns (G a multiple of 32), which the int4 zero point and int8's unsigned offset need.
struct QuantizedX {
  std::vector<int8_t> q, r;
  std::vector<float> lanes, group_sum;
  int64_t kp, groups;
  const float* lane_scales(int64_t i, int64_t k0) const { return lanes.data() + (i * kp + k0) / 64 * 16; }
};

template <typename T>
QuantizedX quantize_rows(const T* x, int64_t m, int64_t k, int64_t group) {
  QuantizedX out;
  out.kp = round_up(k, std::max(CHUNK, group));
  out.groups = out.kp / group;
  out.q.assign(m * out.kp, 0);
  out.r.assign(m * out.kp, 0);
  out.lanes.assign(m * out.kp / 64 * 16, 0.f);
  out.group_sum.assign(m * out.groups, 0.f);
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k0 = 0; k0 < out.kp; k0 += BLOCK) {
        __m512 v[2];
        for (int j = 0; j < 2; ++j) {
          const int64_t left = k - k0 - 16 * j;
          v[j] = left > 0 ? load16(x + i * k + k0 + 16 * j, left) : _mm512_setzero_ps();
        }
        const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        const float scale = top / 127.f;
        const __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
        int32_t sum = 0;  // of 256 q + r
        for (int j = 0; j < 2; ++j) {
          const __m512 t = _mm512_mul_ps(v[j], inv);  // x / scale, in [-127, 127]
          const __m512i qj = _mm512_cvtps_epi32(t);    // round half to even, as torch.round
          const __m512 rest = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(qj)), _mm512_set1_ps(256.f));
          const __m512i rj = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(rest), _mm512_set1_epi32(127)),
                                              _mm512_set1_epi32(-127));
          const int64_t at = i * out.kp + k0 + 16 * j;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + at), _mm512_cvtsepi32_epi8(qj));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out.r.data() + at), _mm512_cvtsepi32_epi8(rj));
          sum += 256 * _mm512_reduce_add_epi32(qj) + _mm512_reduce_add_epi32(rj);
        }
        float* lanes = out.lanes.data() + (i * out.kp + k0) / 64 * 16 + (k0 % 64) / 4;
        for (int l = 0; l < 8; ++l) lanes[l] = scale / 256.f;
        out.group_sum[i * out.groups + k0 / group] += sum * (scale / 256.f);
      }
    }
  });
  return out;
}

float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// acc + 256 * sum(w q) + sum(w r) per int32 lane: w unsigned bytes, q and r x's two signed parts.
// At most 4 * 255 * 127 * 257 < 2^26 per call: no overflow, and exact in fp32 after conversion.
__m512i two_part_dot(__m512i acc, __m512i w, __m512i q, __m512i r) {
  return _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(acc, w, q), 8), w, r);
}

// ---- int8 weight: w[n, k] = qweight[n, k] * scales[n]
// VNNI multiplies unsigned by signed bytes: the weight is made unsigned, w + 128 (an xor of its sign
// bit), so each block's sum is sum(w q) + 128 sum(q), and y = scales[n] * (sum over blocks of
// scale_b * block sum - 128 * sum of the quantized x): the last term is the row's group_sum total.

template <int R, int C, typename Out>  // R weight rows from n, C rows of x from i; y in x's dtype, rounded once
void int8_tile(const int8_t* w, int64_t ldw, int64_t k, const QuantizedX& qx, int64_t i, int64_t n,
               const float* scales, Out* y, int64_t ldy) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < k; k0 += 64) {
    const __mmask64 mask = k - k0 >= 64 ? ~0ULL : (1ULL << (k - k0)) - 1;  // columns past K read as 0 (+128)
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + (n + r) * ldw + k0), bias);
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * ldw + k0), _MM_HINT_T0);  // the next tile's
    }
    for (int c = 0; c < C; ++c) {
      const __m512i xq = _mm512_loadu_si512(qx.q.data() + (i + c) * qx.kp + k0);
      const __m512i xr = _mm512_loadu_si512(qx.r.data() + (i + c) * qx.kp + k0);
      const __m512 xs = _mm512_loadu_ps(qx.lane_scales(i + c, k0));
      for (int r = 0; r < R; ++r) {
        const __m512i dot = two_part_dot(_mm512_setzero_si512(), wv[r], xq, xr);
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xs, acc[r][c]);
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    float offset = 0.f;  // the sum of the quantized x: 128 times it is what the unsigned weight added
    for (int64_t g = 0; g < qx.groups; ++g) offset += qx.group_sum[(i + c) * qx.groups + g];
    for (int r = 0; r < R; ++r) y[(i + c) * ldy + n + r] = static_cast<Out>(scales[n + r] * (hsum(acc[r][c]) - 128.f * offset));
  }
}

// ---- int4 weight: w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g], g = k / G
// Layout (int4_layout in native.py): each 128 columns of a row are 64 bytes, byte j holding column j in
// its low nibble and column 64 + j in its high nibble, so one load gives two 64-column halves. The
// nibbles (0..15) are VNNI's unsigned operand as they are. y = sum over groups of
// scales[g] * (sum(q x) - zeros[g] * sum(x)) = (the blocks' sums) - sum_g scaled_zeros[g] * group_sum[g].

template <int G>  // lane scales of one half (64 columns, 16 int32 lanes of 4 columns) of chunk `chunk`
__m512 half_scales(const float* s, int64_t chunk, int half) {
  if constexpr (G >= 128) {
    return _mm512_set1_ps(s[chunk * CHUNK / G]);
  } else if constexpr (G == 64) {
    return _mm512_set1_ps(s[chunk * 2 + half]);
  } else {  // G == 32: lanes 0-7 one group, 8-15 the next
    const float* g = s + chunk * 4 + half * 2;
    return _mm512_insertf32x8(_mm512_set1_ps(g[0]), _mm256_set1_ps(g[1]), 1);
  }
}

template <int G, int R, int C, typename Out>
void int4_tile(const uint8_t* w, int64_t ldw, const QuantizedX& qx, int64_t i, int64_t n, const float* scales,
               const float* scaled_zeros, int64_t lds, Out* y, int64_t ldy) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t chunk = 0; chunk < qx.kp / CHUNK; ++chunk) {
    __m512i lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_loadu_si512(w + (n + r) * ldw + chunk * 64);
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * ldw + chunk * 64), _MM_HINT_T0);  // the next tile's
      lo[r] = _mm512_and_si512(v, low4);                         // columns 0..63 of the chunk
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);  // columns 64..127
    }
    for (int c = 0; c < C; ++c) {
      const int64_t at = (i + c) * qx.kp + chunk * CHUNK;
      const __m512i qlo = _mm512_loadu_si512(qx.q.data() + at), qhi = _mm512_loadu_si512(qx.q.data() + at + 64);
      const __m512i rlo = _mm512_loadu_si512(qx.r.data() + at), rhi = _mm512_loadu_si512(qx.r.data() + at + 64);
      const __m512 slo = _mm512_loadu_ps(qx.lane_scales(i + c, chunk * CHUNK));
      const __m512 shi = _mm512_loadu_ps(qx.lane_scales(i + c, chunk * CHUNK + 64));
      for (int r = 0; r < R; ++r) {
        const float* s = scales + (n + r) * lds;
        const __m512 tlo = _mm512_mul_ps(_mm512_cvtepi32_ps(two_part_dot(_mm512_setzero_si512(), lo[r], qlo, rlo)), slo);
        const __m512 thi = _mm512_mul_ps(_mm512_cvtepi32_ps(two_part_dot(_mm512_setzero_si512(), hi[r], qhi, rhi)), shi);
        if constexpr (G >= 128) {  // one weight scale for the whole chunk
          acc[r][c] = _mm512_fmadd_ps(_mm512_add_ps(tlo, thi), _mm512_set1_ps(s[chunk * CHUNK / G]), acc[r][c]);
        } else {
          acc[r][c] = _mm512_fmadd_ps(tlo, half_scales<G>(s, chunk, 0), acc[r][c]);
          acc[r][c] = _mm512_fmadd_ps(thi, half_scales<G>(s, chunk, 1), acc[r][c]);
        }
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    const float* gs = qx.group_sum.data() + (i + c) * qx.groups;
    for (int r = 0; r < R; ++r) {
      const float* sz = scaled_zeros + (n + r) * lds;
      float zero_term = 0.f;
      for (int64_t g = 0; g < qx.groups; ++g) zero_term += sz[g] * gs[g];
      y[(i + c) * ldy + n + r] = static_cast<Out>(hsum(acc[r][c]) - zero_term);
    }
  }
}

// Every (R x C) tile of y [M, N]: the threads take whole tiles of NR weight rows (each weight row is
// read from memory once, by one thread, for all M rows of x). One row of x (a decode step at batch 1)
// takes the weight a row at a time instead: one sequential stream per thread, which the memory
// prefetchers follow best (from 2 rows of x on, tiles of 4 are faster: benchmarks/matmul.py). Each
// row's sums are the same either way.
template <typename Tile>
void for_each_tile(int64_t m, int64_t n, const Tile& tile) {
  if (m == 1) {
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) tile(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{}, 0, r);
    });
    return;
  }
  const int64_t tiles = (n + NR - 1) / NR;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * NR;
      if (n0 + NR <= n) {
        int64_t i = 0;
        for (; i + MR <= m; i += MR) tile(std::integral_constant<int, NR>{}, std::integral_constant<int, MR>{}, i, n0);
        for (; i < m; ++i) tile(std::integral_constant<int, NR>{}, std::integral_constant<int, 1>{}, i, n0);
      } else {
        for (int64_t r = n0; r < n; ++r)
          for (int64_t i = 0; i < m; ++i) tile(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{}, i, r);
      }
    }
  });
}

// fn(y's data as float* or at::BFloat16*): the kernels write y in x's dtype, each value rounded once from its
// fp32 sum (to nearest even, as .to(torch.bfloat16) rounds), with no fp32 copy of y to cast afterwards.
template <typename Fn>
void with_output(at::Tensor& y, const Fn& fn) {
  if (y.scalar_type() == at::kBFloat16) fn(y.data_ptr<at::BFloat16>());
  else fn(y.data_ptr<float>());
}

QuantizedX quantize(const at::Tensor& x, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "zoo_native: x must be a contiguous [M, K] tensor");
  if (x.scalar_type() == at::kBFloat16)
    return quantize_rows(x.data_ptr<at::BFloat16>(), x.size(0), x.size(1), group);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "zoo_native: x must be bf16 or fp32, got ", x.scalar_type());
  return quantize_rows(x.data_ptr<float>(), x.size(0), x.size(1), group);
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.stride(1) == 1 &&
              qweight.size(1) == x.size(1), "zoo_native::int8_mm: qweight must be int8 [N, K] with rows of stride 1");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == qweight.size(0),
              "zoo_native::int8_mm: scales must be fp32 [N]");
  const int64_t m = x.size(0), n = qweight.size(0), k = qweight.size(1);
  const QuantizedX qx = quantize(x, CHUNK);
  at::Tensor y = at::empty({m, n}, x.options());
  const int8_t* w = qweight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  with_output(y, [&](auto* out) {
    for_each_tile(m, n, [&](auto r, auto c, int64_t i, int64_t n0) {
      int8_tile<decltype(r)::value, decltype(c)::value>(w, qweight.stride(0), k, qx, i, n0, s, out, n);
    });
  });
  return y;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                   const at::Tensor& scaled_zeros, int64_t group) {
  const int64_t m = x.size(0), n = packed.size(0), kp = round_up(x.size(1), std::max(CHUNK, group));
  TORCH_CHECK(group == 32 || group == 64 || group == 128 || group == 256, "zoo_native::int4_mm: group_size ", group);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
              packed.size(1) * 2 == kp, "zoo_native::int4_mm: packed must be uint8 [N, K/2] with K rounded up to ",
              std::max(CHUNK, group), ", got ", packed.sizes(), " for x ", x.sizes());
  for (const at::Tensor* t : {&scales, &scaled_zeros})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == n &&
                t->size(1) == kp / group, "zoo_native::int4_mm: scales and scaled_zeros must be fp32 [N, Kp/G]");
  const QuantizedX qx = quantize(x, group);
  at::Tensor y = at::empty({m, n}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float *s = scales.data_ptr<float>(), *sz = scaled_zeros.data_ptr<float>();
  const int64_t ldw = packed.size(1), lds = scales.size(1);
  with_output(y, [&](auto* out) {
    for_each_tile(m, n, [&](auto r, auto c, int64_t i, int64_t n0) {
      constexpr int R = decltype(r)::value, C = decltype(c)::value;
      switch (group) {
        case 32: int4_tile<32, R, C>(w, ldw, qx, i, n0, s, sz, lds, out, n); break;
        case 64: int4_tile<64, R, C>(w, ldw, qx, i, n0, s, sz, lds, out, n); break;
        case 128: int4_tile<128, R, C>(w, ldw, qx, i, n0, s, sz, lds, out, n); break;
        default: int4_tile<256, R, C>(w, ldw, qx, i, n0, s, sz, lds, out, n); break;
      }
    });
  });
  return y;
}

// ---- the weights dequantized to bf16 [N, K], for many rows of x (a prefill): then one bf16 GEMM
// (F.linear) beats the integer kernels above. Each weight is rounded to bf16 once, to nearest even.

void store_bf16(at::BFloat16* out, __m512 v) {  // 16 fp32 (finite) -> bf16, rounded to nearest even
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

at::Tensor int8_dequantize(const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.stride(1) == 1 &&
              scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == qweight.size(0),
              "zoo_native::int8_dequantize: qweight int8 [N, K] (rows of stride 1) and scales fp32 [N]");
  const int64_t n = qweight.size(0), k = qweight.size(1), ldw = qweight.stride(0);
  at::Tensor w = at::empty({n, k}, qweight.options().dtype(at::kBFloat16));
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  at::BFloat16* out = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const __m512 scale = _mm512_set1_ps(s[row]);
      int64_t j = 0;
      for (; j + 16 <= k; j += 16) {
        const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + row * ldw + j)));
        store_bf16(out + row * k + j, _mm512_mul_ps(_mm512_cvtepi32_ps(v), scale));
      }
      for (; j < k; ++j) out[row * k + j] = static_cast<at::BFloat16>(q[row * ldw + j] * s[row]);
    }
  });
  return w;
}

// A row's 4-bit codes become bf16 through a table: the 16 values q * scale - scaled_zero (q = 0..15) of a
// group, each rounded as store_bf16 rounds, looked up 32 at a time by _mm512_permutexvar_epi16 (the codes
// widened to 16-bit indices): the same bits as computing each weight, in 3 instructions per 32 weights.
__m512i int4_table(float scale, float scaled_zero) {
  const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) at::BFloat16 table[32] = {};
  store_bf16(table, _mm512_fmsub_ps(q, _mm512_set1_ps(scale), _mm512_set1_ps(scaled_zero)));
  return _mm512_load_si512(table);
}

void int4_dequantize_rows(const uint8_t* p, const float* s, const float* sz, int64_t lds, int64_t group, int64_t kp,
                          int64_t begin, int64_t end, at::BFloat16* out) {  // rows begin..end into out [end-begin, kp]
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t row = begin; row < end; ++row) {
    at::BFloat16* dst = out + (row - begin) * kp;
    int64_t table_group = -1;
    __m512i table = _mm512_setzero_si512();
    for (int64_t chunk = 0; chunk < kp / CHUNK; ++chunk) {
      const __m512i v = _mm512_loadu_si512(p + row * kp / 2 + chunk * 64);
      const __m512i halves[2] = {_mm512_and_si512(v, low4), _mm512_and_si512(_mm512_srli_epi16(v, 4), low4)};
      for (int half = 0; half < 2; ++half) {
        for (int part = 0; part < 2; ++part) {  // 32 columns, all in one group (G >= 32)
          const int64_t col = chunk * CHUNK + half * 64 + part * 32, g = col / group;
          if (g != table_group) table = int4_table(s[row * lds + g], sz[row * lds + g]), table_group = g;
          const __m256i codes = part ? _mm512_extracti64x4_epi64(halves[half], 1) : _mm512_castsi512_si256(halves[half]);
          _mm512_storeu_si512(dst + col, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(codes), table));
        }
      }
    }
  }
}

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& scaled_zeros,
                           int64_t group, int64_t k) {
  const int64_t n = packed.size(0), kp = packed.size(1) * 2, lds = scales.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && kp % CHUNK == 0 && k <= kp &&
              scales.sizes() == scaled_zeros.sizes() && lds * group == kp && scales.is_contiguous() &&
              scaled_zeros.is_contiguous() && group % BLOCK == 0,
              "zoo_native::int4_dequantize: the layout of native.int4_layout");
  at::Tensor w = at::empty({n, kp}, scales.options().dtype(at::kBFloat16));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float *s = scales.data_ptr<float>(), *sz = scaled_zeros.data_ptr<float>();
  at::BFloat16* out = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    int4_dequantize_rows(p, s, sz, lds, group, kp, begin, end, out + begin * kp);
  });
  return kp == k ? w : w.narrow(1, 0, k);
}

// x [M, K] @ the dequantized weight.T in one operator, so that torch.compile calls it as it is (inductor
// would otherwise lower the bf16 GEMM of a weight it cannot see to slower code of its own). The weight is
// dequantized a block of rows at a time (about 4 MB of bf16, which the GEMM then reads from cache) and
// each block multiplied at once: the whole bf16 weight is never in memory (a 32000-row output layer's
// would be 131 MB written and read per call, slower than blocks that stay in cache: benchmarks/matmul.py).
constexpr int64_t DEQUANTIZE_BLOCK_BYTES = 4 << 20;

template <typename Dequantize>  // dequantize(begin, end) -> the bf16 weight rows begin..end, [end - begin, K]
at::Tensor blockwise_mm(const at::Tensor& x, int64_t n, const Dequantize& dequantize) {
  const int64_t rows = std::max<int64_t>(64, DEQUANTIZE_BLOCK_BYTES / (2 * x.size(-1)) / 64 * 64);
  if (n <= rows) return at::linear(x, dequantize(0, n));
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    y.narrow(1, r0, r).copy_(at::linear(x, dequantize(r0, r0 + r)));
  }
  return y;
}

at::Tensor int8_dequantize_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  return blockwise_mm(x, qweight.size(0), [&](int64_t begin, int64_t end) {
    return int8_dequantize(qweight.narrow(0, begin, end - begin), scales.narrow(0, begin, end - begin));
  });
}

at::Tensor int4_dequantize_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                              const at::Tensor& scaled_zeros, int64_t group) {
  return blockwise_mm(x, packed.size(0), [&](int64_t begin, int64_t end) {
    return int4_dequantize(packed.narrow(0, begin, end - begin), scales.narrow(0, begin, end - begin),
                           scaled_zeros.narrow(0, begin, end - begin), group, x.size(-1));
  });
}

// ---- bf16 weight and bf16 x, nothing quantized: y = x w^T + bias, as F.linear computes it (fp32 sums, rounded
// to bf16 once), for the few rows of a decode step, where this reads the weight faster than torch's GEMM
// (benchmarks/matmul.py). _mm512_dpbf16_ps multiplies 32 bf16 pairs (exactly, in fp32) and adds them into 16
// fp32 lanes; only this function uses AVX512-BF16 (compiled for it alone: native.py calls it where the CPU has it).

template <int R, int C>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void bf16_tile(const at::BFloat16* x, int64_t k, const at::BFloat16* w, int64_t ldw, int64_t i, int64_t n,
               const float* bias, at::BFloat16* y, int64_t ldy) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < k; k0 += 32) {
    const __mmask32 mask = k - k0 >= 32 ? ~0u : (1u << (k - k0)) - 1;  // columns past K read as 0
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_maskz_loadu_epi16(mask, w + (n + r) * ldw + k0);
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * ldw + k0), _MM_HINT_T0);  // the next tile's
    }
    for (int c = 0; c < C; ++c) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (i + c) * k + k0);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, (__m512bh)wv[r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r)
      y[(i + c) * ldy + n + r] = static_cast<at::BFloat16>(hsum(acc[r][c]) + (bias ? bias[n + r] : 0.f));
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && x.dim() == 2 &&
              x.is_contiguous() && weight.dim() == 2 && weight.stride(1) == 1 && weight.size(1) == x.size(1),
              "zoo_native::bf16_linear: x bf16 [M, K] contiguous and weight bf16 [N, K] with rows of stride 1, got x ",
              x.sizes(), " ", x.scalar_type(), ", weight ", weight.sizes(), " ", weight.scalar_type());
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "zoo_native::bf16_linear: bias must be [N]");
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({m, n}, x.options());
  const at::BFloat16 *xp = x.data_ptr<at::BFloat16>(), *wp = weight.data_ptr<at::BFloat16>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::BFloat16* out = y.data_ptr<at::BFloat16>();
  for_each_tile(m, n, [&](auto r, auto c, int64_t i, int64_t n0) {
    bf16_tile<decltype(r)::value, decltype(c)::value>(xp, k, wp, weight.stride(0), i, n0, bp, out, n);
  });
  return y;
}

// ---- rotary embeddings: zoo/rotary.py's apply_rotary, each element by the same fp32 operations in the same
// order (x1 cos - x2 sin and x1 sin + x2 cos, or x2 cos + x1 sin for the half-split pairing; no fused
// multiply-add: -ffp-contract=off) and rounded to x's dtype once, so its bits are apply_rotary's. One pass
// instead of about ten operators per tensor: a decode step's q and k are small, and each operator costs
// more than its arithmetic. The first D' = 2 * cos.size(3) dims of each head turn; the rest are copied.

template <typename T>
void rotary_rows(const T* x, T* out, const float* cos, const float* sin, int64_t b0, int64_t b1, int64_t s,
                 int64_t h, int64_t d, int64_t half, bool per_row, bool interleaved) {
  for (int64_t bs = b0; bs < b1; ++bs) {  // (row, position) pairs
    const int64_t angle = ((per_row ? bs / s : 0) * s + bs % s) * half;
    const float *c = cos + angle, *sn = sin + angle;
    for (int64_t head = 0; head < h; ++head) {
      const T* in = x + (bs * h + head) * d;
      T* o = out + (bs * h + head) * d;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        const float x1 = static_cast<float>(in[a]), x2 = static_cast<float>(in[b]);
        const float first = x1 * c[i] - x2 * sn[i];
        const float second = interleaved ? x1 * sn[i] + x2 * c[i] : x2 * c[i] + x1 * sn[i];
        o[a] = static_cast<T>(first);
        o[b] = static_cast<T>(second);
      }
      for (int64_t j = 2 * half; j < d; ++j) o[j] = in[j];
    }
  }
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "zoo_native::rotary: x must be a contiguous bf16 or fp32 [B, S, H, D] tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t batch = x.size(0), s = x.size(1), h = x.size(2), d = x.size(3);
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 && t->sizes() == cos.sizes() &&
                (t->size(0) == 1 || t->size(0) == batch) && t->size(1) == s && t->size(2) == 1 && 2 * t->size(3) <= d,
                "zoo_native::rotary: cos and sin must be contiguous fp32 [B or 1, S, 1, D'/2] with D' <= D, got ",
                t->sizes(), " for x ", x.sizes());
  at::Tensor out = at::empty_like(x);
  const int64_t half = cos.size(3);
  const bool per_row = cos.size(0) > 1;
  at::parallel_for(0, batch * s, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, h * d)), [&](int64_t b0, int64_t b1) {
    if (x.scalar_type() == at::kBFloat16)
      rotary_rows(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                  b0, b1, s, h, d, half, per_row, interleaved);
    else
      rotary_rows(x.data_ptr<float>(), out.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), b0, b1, s,
                  h, d, half, per_row, interleaved);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(zoo_native, m) {
  m.def("int8_mm(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales, Tensor scaled_zeros, int group_size) -> Tensor");
  m.def("int8_dequantize(Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor scales, Tensor scaled_zeros, int group_size, int k) -> Tensor");
  m.def("int8_dequantize_mm(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_dequantize_mm(Tensor x, Tensor packed, Tensor scales, Tensor scaled_zeros, int group_size) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_native, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_dequantize", &int8_dequantize);
  m.impl("int4_dequantize", &int4_dequantize);
  m.impl("int8_dequantize_mm", &int8_dequantize_mm);
  m.impl("int4_dequantize_mm", &int4_dequantize_mm);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("rotary", &rotary);
}
