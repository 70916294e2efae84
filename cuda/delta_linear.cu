// Dequant-matmul of a delta bank (bank layout 2, see deltacomp/kernels/bank.py and README.md here):
//
//   t[r, j]   = sum_k x[r, k] * V[j, k]                                   stage 1 ("shrink")
//   c[r, j]   = t[r, j] * s[j] * w[r, delta(j)]
//   out[r, o] = y[r, o] + sum_{j in proj p} c[r, j] * U[j, o - out_off(p)]  stage 2 ("expand")
//
// V and U rows are bit-packed codes (1, 2, 3, 4 or 8 bits; quant/packing.py) with fp16 (scale, offset) per group;
// they are decoded in registers and never written out dequantized. Accumulation is fp32 throughout.
//
// This file has no torch dependency: binding.cpp calls its entry points, declared in delta_linear.h.
//
// Launch sequence (both on the caller's stream; no host synchronisation, no device-to-host reads):
//   1. shrink_kernel  grid (ceil(J / 32), KS, row tiles): 8 warps x 4 rank rows per CTA, each CTA one slice of the K
//                     (input) dimension. Writes sw[j][r] = s[j] * w[r, delta(j)] (K slice 0 only) and the partial dot
//                     products tpart[ks][j][r] of active rank rows; zeroes stage 2's split counters. (A multi-tenant
//                     plan launches fewer CTAs per row tile, each taking the groups of its row's deltas: shrink_ctas.)
//   2. expand_kernel  grid (output slots, NS, row tiles): each CTA owns W2 outputs of one projection and one slice of
//                     that projection's rank rows; c = sw * sum_ks tpart is formed as rank rows are staged. With one
//                     split it writes out = y + acc; otherwise each split stores an fp32 partial tile and the last
//                     split of a tile to finish (atomic count) writes out = y + the partials summed in split order.
// The fused form (delta_linear_base_launch) adds the base layer's product x @ W^T with two more kernels:
//   3. base_kernel    grid (ceil(M / 16), row tiles, 2 input slices): each warp computes two outputs' dot products
//                     over one slice of K from W and x (16-byte loads, fp32 sums) into that slice's fp32 plane. It
//                     starts once x is complete (stage 1 lets the next grid start only after its own wait) and runs
//                     beside the delta's stages, which are few CTAs (two per SM each), without waiting (but for its
//                     last CTA).
//   4. finish_kernel  out = bias + the base planes + stage 2's planes (stage 2 then only stores planes).
// At one token row (a decode step) the fused form is instead a single kernel, row_kernel (its section below): each
// CTA of one wave computes consecutive slices of the outputs, base product and delta, and stage 1's rank rows are
// shared out at run time.
// On sm_90 the kernels are launched with programmatic dependent launch: each kernel's prologue (the bank's metadata,
// its first packed words and, with a single delta, stage 1 asking L2 for all of stage 2's factor) overlaps the tail of
// the kernel ahead of it, and nothing produced by an earlier kernel is read before griddepcontrol.wait.
//
// A rank row is "active" for a row tile when w[r, delta(j)] != 0 for some row r of the tile. Inactive rows are never
// read in either stage (their packed words, scales and offsets stay untouched), which is what makes a one-hot w over
// many deltas cost only the bytes of the deltas in use. Token rows are tiled by 1 to 16 (by the row count, capped by
// the caller's row_tile): a multi-tenant batch (each row its own delta) asks for tiles of one row, so that each tile
// reads and computes only its own delta.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "delta_linear.h"

namespace deltacomp {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int kRowsPerWarp = 4;                       // stage 1: rank rows per warp, sharing each x load
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;    // stage 1: rank rows per CTA
constexpr int kShrinkSmemFloats = 48 * 1024 / 4;      // stage 1 dynamic shared memory budget (no opt-in needed)
constexpr int kMaxSplits = 16;                        // stage 2: most rank-row slices per projection

// ------------------------------------------------------------------------------------------------------------------
// Tiling parameters, shared by host planning and device code. R_TILE is the number of token rows per tile
// (1, 2, 4, 8 or 16).
// ------------------------------------------------------------------------------------------------------------------

// Floats per shared-memory access of x (float, float2 or float4).
__host__ __device__ constexpr int vec_width(int r_tile) { return r_tile < 4 ? r_tile : 4; }
// Stage 1: codes per lane and pass (a lane decodes one "unit" of this many consecutive codes of a 32-code block).
__host__ __device__ constexpr int shrink_opl(int r_tile) { return r_tile >= 16 ? 16 : 32; }
// Stage 2: outputs per lane; R_TILE x OPL fp32 accumulators per lane (16 for R_TILE 1, else 64).
__host__ __device__ constexpr int expand_opl(int r_tile) { return r_tile <= 1 ? 16 : r_tile <= 2 ? 32 : 64 / r_tile; }
// Stage 1 x tile in shared memory: one unit holds OPL codes x R_TILE rows as (R_TILE / VW) runs of OPL vectors,
// plus one vector of padding so that the 32 lanes (reading unit z = lane at the same code) hit distinct banks (with
// folded parameters it holds the unit's x sum).
__host__ __device__ constexpr int unit_floats(int r_tile) {
  return (r_tile / vec_width(r_tile) * shrink_opl(r_tile) + 1) * vec_width(r_tile);
}
__host__ __device__ constexpr int block_floats(int r_tile) { return 32 / shrink_opl(r_tile) * unit_floats(r_tile); }
// One-row tiles of 16-bit activations fold each code's scale and offset out of the inner sums: stage 1 sums u x per
// unit and adds mul * that + add * (the unit's x sum, staged in its padding); stage 2 adds (c mul) u per code and
// c add once per lane. One FMA a code instead of two (stage 2 of the two-kernel op goes further: integer products,
// expand_run's INT). fp32 activations keep the per-code dequantization: the folded sums cancel more (3.4e-5 of the
// delta's norm on a 200 x 1 projection at 128-entry groups, over the 2e-5 that cuda/check_standalone.cu allows fp32).
template <typename scalar_t, int R_TILE>
__host__ __device__ constexpr bool fold_params() {
  return R_TILE == 1 && sizeof(scalar_t) == 2;
}

// Resident CTAs per SM that the register allocation must allow (at most 65536 / (256 * n) registers per thread; with
// these values ptxas spills at most one 4-byte slot in any instantiation). The host plans about this many CTAs per SM
// for each stage.
__host__ __device__ constexpr int shrink_min_ctas(int r_tile) { return r_tile <= 2 ? 3 : 2; }
__host__ __device__ constexpr int expand_min_ctas(int r_tile) { return r_tile <= 1 ? 3 : 2; }

__host__ __device__ constexpr int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }
__host__ __device__ constexpr int ilog2(int v) { return v <= 1 ? 0 : 1 + ilog2(v / 2); }

// int32 words a lane reads to get OPL consecutive codes of one block (aligned to OPL codes).
template <int BITS, int OPL>
__host__ __device__ constexpr int lane_words() {
  return OPL == 32 ? BITS : (BITS == 3 ? 2 : (BITS * OPL >= 32 ? BITS * OPL / 32 : 1));
}

// ------------------------------------------------------------------------------------------------------------------
// Scalar access (torch builds with __CUDA_NO_HALF_OPERATORS__ and friends: intrinsics only)
// ------------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float load_f32(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_f32(const __half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) {
  return __bfloat162float(__ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p))));
}
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <int V>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[V]) {  // p aligned to V floats (V = 1, 2, 4k)
  if constexpr (V == 1) {
    v[0] = *p;
  } else if constexpr (V == 2) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    v[0] = t.x, v[1] = t.y;
  } else {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      const float4 t = *reinterpret_cast<const float4*>(p + i);
      v[i] = t.x, v[i + 1] = t.y, v[i + 2] = t.z, v[i + 3] = t.w;
    }
  }
}

template <int V>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[V]) {
  if constexpr (V == 1) {
    *p = v[0];
  } else if constexpr (V == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  } else {
#pragma unroll
    for (int i = 0; i < V; i += 4) *reinterpret_cast<float4*>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  }
}

__device__ __forceinline__ bool valid_bits(int b) { return b == 1 || b == 2 || b == 3 || b == 4 || b == 8; }

// Calls f(std::integral_constant<int, B>()) for the width B that `bits` names (1, 2, 3, 4 or 8), so that each width's
// code is compiled with its width known; does nothing for another value and says whether it called f.
template <typename F>
__device__ __forceinline__ bool with_width(int bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>()); return true;
    case 2: f(std::integral_constant<int, 2>()); return true;
    case 3: f(std::integral_constant<int, 3>()); return true;
    case 4: f(std::integral_constant<int, 4>()); return true;
    case 8: f(std::integral_constant<int, 8>()); return true;
    default: return false;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90): both kernels are launched allowed to start before the kernel ahead of them
// in the stream has finished. Before wait_prior_grids() a kernel reads only the bank (immutable); everything written
// by earlier kernels (x, y, w, stage 1's output) and every write of its own comes after. allow_next_grid() lets the
// next kernel be scheduled once every CTA of this one has started. On older GPUs both are no-ops and the launches
// are ordinary stream-ordered launches.
// ------------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ void wait_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The fused form hands stage 1's results to stage 2 per rank-row group instead of per grid: a stage 1 CTA counts
// each (row tile, group) it computed done in ready[tile][group] once its writes are visible (every thread of the CTA
// calls this; no-op without `ready`), and a stage 2 warp waits for the groups of the rows it is about to read
// (await_count).
__device__ __forceinline__ void count_done(int* ready, size_t idx) {
  if (ready == nullptr) return;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(ready + idx, 1);
}

// Stores v with L2's evict-last priority: a value read again late in the call, after the weight stream has passed
// through L2 (plain stores' lines are evicted by it, and the reads then go to DRAM).
__device__ __forceinline__ void store_evict_last(int4* p, const int4& v) {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  asm volatile("st.global.L2::cache_hint.v4.s32 [%0], {%1, %2, %3, %4}, %5;" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w), "l"(policy)
               : "memory");
}

// Orders this thread's earlier memory operations before its later ones for any thread that acquires what a later
// one writes (lighter than __threadfence's sequentially consistent fence).
__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// Waits until *p reaches `target` (an acquire at device scope: what the counting CTAs wrote before counting is then
// visible to this thread's later reads). Stage 1 has every CTA started before stage 2 can start (its late trigger),
// so the counts always arrive.
__device__ __forceinline__ void await_count(const int* p, int target) {
  for (;;) {
    int v;
    asm volatile("ld.global.acquire.gpu.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    if (v >= target) return;
    __nanosleep(64);
  }
}

// Asks L2 to fetch share `part` of `parts` equal shares of [p, p + bytes) (128-byte lines), one line per thread and
// pass: no registers are held and nothing waits for the data.
__device__ __forceinline__ void prefetch_share_l2(const void* p, size_t bytes, size_t part, size_t parts) {
  const size_t lines = (bytes + 127) / 128, per = (lines + parts - 1) / parts;
  const size_t lo = part * per, hi = lo + per < lines ? lo + per : lines;
  const char* base = static_cast<const char*>(p);
  for (size_t l = lo + threadIdx.x; l < hi; l += kThreads)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(base + l * 128));
}

// (scale, offset) group of code k, through a packed group size gp: log2(gs) for a power-of-two gs, 31 for gs == 0
// (one group per row; k < 2^31), else -gs (a division).
__device__ __forceinline__ int group_code(int gs) {
  if (gs <= 0) return 31;
  return (gs & (gs - 1)) == 0 ? __ffs(gs) - 1 : -gs;
}
__device__ __forceinline__ int group_index(int k, int gp) { return gp >= 0 ? k >> gp : k / -gp; }

// ------------------------------------------------------------------------------------------------------------------
// Decoding
//
// A code is turned into a float without an int->float conversion: placed in the top BITS mantissa bits of 1.0f it
// reads as u = 1 + code / 2^BITS, and value = code * scale + offset = u * (scale * 2^BITS) + (offset - scale * 2^BITS)
// is one FMA. scale * 2^BITS is exact; offset - scale * 2^BITS carries one fp32 rounding of the operands' size.
// ------------------------------------------------------------------------------------------------------------------

template <int BITS>
__device__ __forceinline__ void load_params(const __half* scale, const __half* offset, int idx, float& mul,
                                            float& add) {
  const float sc = load_f32(scale + idx);
  const float of = load_f32(offset + idx);
  mul = sc * static_cast<float>(1 << BITS);
  add = of - mul;
}

// The fp16 (scale, offset) pair idx as one word (scale in the low half), its halves as floats, and their expansion
// into (mul, add) above.
__device__ __forceinline__ uint32_t load_param_pair(const __half* scale, const __half* offset, int idx) {
  return __ldg(reinterpret_cast<const unsigned short*>(scale) + idx) |
         static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(offset) + idx)) << 16;
}
__device__ __forceinline__ float pair_scale(uint32_t pair) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(pair & 0xffffu)));
}
__device__ __forceinline__ float pair_offset(uint32_t pair) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(pair >> 16)));
}
template <int BITS>
__device__ __forceinline__ void expand_param_pair(uint32_t pair, float& mul, float& add) {
  mul = pair_scale(pair) * static_cast<float>(1 << BITS);
  add = pair_offset(pair) - mul;
}

// Bits [pos, pos + BITS) of the little-endian stream v[] as 1 + code / 2^BITS. pos is a compile-time constant after
// unrolling, so the word index and shifts fold away: one shift (or funnel shift) and one LOP3 per code.
template <int BITS, int NV>
__device__ __forceinline__ float unit_code(const uint32_t (&v)[NV], int pos) {
  constexpr int kZ = 23 - BITS;  // code lands in mantissa bits [kZ, 23)
  constexpr uint32_t kMask = ((1u << BITS) - 1u) << kZ;
  const int wi = pos >> 5, sh = pos & 31;
  uint32_t t;
  if (sh + BITS <= 32 || wi + 1 >= NV) {
    t = sh >= kZ ? (v[wi] >> (sh - kZ)) : (v[wi] << (kZ - sh));
  } else {
    t = __funnelshift_r(v[wi], v[wi + 1], sh - kZ);  // straddles words wi / wi + 1 (3-bit codes 10 and 21)
  }
  // (t & kMask) | 1.0f in one LOP3: written in C++ it compiles to two (a LOP3 takes one immediate), so 1.0f's bits
  // are passed in a register.
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(t), "n"(kMask), "r"(0x3f800000u));
  return __uint_as_float(r);
}

// Loads the raw words holding codes [q0, q0 + OPL) of one packed block (blk points at the block's first word): NW
// words from word (BITS * q0) / 32 of the block; a word past the block's end reads as zero (3-bit lanes only).
// q0 is a multiple of OPL. Vector loads rely on 16-byte aligned row starts (bank layout 2).
template <int BITS, int OPL>
__device__ __forceinline__ void load_lane_words(const int32_t* __restrict__ blk, int q0,
                                                uint32_t (&v)[lane_words<BITS, OPL>()]) {
  constexpr int NW = lane_words<BITS, OPL>();
  if constexpr (OPL == 32) {  // the whole block: BITS words at word offset bi * BITS of the row
    if constexpr (BITS == 1) {
      v[0] = static_cast<uint32_t>(__ldg(blk));
    } else if constexpr (BITS == 2) {
      const int2 t = __ldg(reinterpret_cast<const int2*>(blk));
      v[0] = t.x, v[1] = t.y;
    } else if constexpr (BITS == 3) {  // 12-byte blocks are only 4-byte aligned
      v[0] = __ldg(blk), v[1] = __ldg(blk + 1), v[2] = __ldg(blk + 2);
    } else {
#pragma unroll
      for (int i = 0; i < NW; i += 4) {
        const int4 t = __ldg(reinterpret_cast<const int4*>(blk + i));
        v[i] = t.x, v[i + 1] = t.y, v[i + 2] = t.z, v[i + 3] = t.w;
      }
    }
  } else if constexpr (BITS == 3) {  // 3 * OPL bits from bit 3 * q0: at most two words, the second maybe absent
    const int ws = (3 * q0) >> 5;
    v[0] = __ldg(blk + ws);
    v[1] = ws + 1 < 3 ? static_cast<uint32_t>(__ldg(blk + ws + 1)) : 0u;
  } else {  // power-of-two width: the lane's bits are NW aligned words, or a part of one word
    const int ws = (BITS * q0) >> 5;
    if constexpr (NW == 1) {
      v[0] = static_cast<uint32_t>(__ldg(blk + ws));
    } else if constexpr (NW == 2) {
      const int2 t = __ldg(reinterpret_cast<const int2*>(blk + ws));
      v[0] = t.x, v[1] = t.y;
    } else {
      static_assert(NW == 4, "unexpected lane word count");
      const int4 t = __ldg(reinterpret_cast<const int4*>(blk + ws));
      v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
    }
  }
}

// Shifts the words of load_lane_words so that code q0 + e starts at stream bit BITS * e of v[].
template <int BITS, int OPL>
__device__ __forceinline__ void align_lane_words(uint32_t (&v)[lane_words<BITS, OPL>()], int q0) {
  if constexpr (OPL < 32 && BITS == 3) {
    const int s0 = (3 * q0) & 31;
    v[0] = __funnelshift_r(v[0], v[1], s0);
    v[1] >>= s0;
  } else if constexpr (OPL < 32 && BITS * OPL < 32) {
    v[0] >>= (BITS * q0) & 31;
  }
}

// Runtime-width form of load_lane_words for the first unit of a tile, requested before x is staged: rows whose lane
// needs at most 2 words (1 and 2 bits, and 3 bits with half-block lanes; wider rows are left to the loop).
// Returns whether the words were loaded.
template <int OPL>
__device__ __forceinline__ bool prefetch_lane_words(const int32_t* __restrict__ blk, int bits, int q0,
                                                    uint32_t (&v)[2]) {
  const int nw = OPL == 32 ? bits : (bits == 3 ? 2 : (bits * OPL >= 32 ? bits * OPL / 32 : 1));
  if (nw > 2) return false;
  const int ws = OPL == 32 ? 0 : (bits * q0) >> 5;
  v[0] = __ldg(blk + ws);
  v[1] = nw > 1 && ws + 1 < bits ? static_cast<uint32_t>(__ldg(blk + ws + 1)) : 0u;
  return true;
}

// Integer products of codes. dp2a adds two products of 16-bit signed multipliers (the halves of `pair`) and unsigned
// bytes (bytes 0 and 1 of `bytes` for .lo, 2 and 3 for .hi) to acc.
__device__ __forceinline__ int dp2a_lo(uint32_t pair, uint32_t bytes, int acc) {
  int d;
  asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(pair), "r"(bytes), "r"(acc));
  return d;
}
__device__ __forceinline__ int dp2a_hi(uint32_t pair, uint32_t bytes, int acc) {
  int d;
  asm("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(pair), "r"(bytes), "r"(acc));
  return d;
}

// acc[e] += m_a * code_a(e) + m_b * code_b(e), e < 16, for two rows of width BITS whose 16 codes start at bit 0 of
// a[] and b[] (align_lane_words), m_a and m_b the low and high int16 halves of `pair`. A byte permute puts the two
// rows' bytes side by side; masks leave one code in each byte (the same output in bytes 0 and 1, another in 2 and 3),
// and each dp2a adds one output's two products: about one instruction a code, against three for a decode into float
// and an FMA. Exact in int32 for |m| <= 32767 and up to 16 rows (255 * 32767 * 16 < 2^31).
template <int BITS, int NW>
__device__ __forceinline__ void pair_products(int (&acc)[16], const uint32_t (&a)[NW], const uint32_t (&b)[NW],
                                              uint32_t pair) {
  if constexpr (BITS == 3) {  // codes e and e + 8 lie 24 bits apart: bytes 0 and 3 of the stream shifted by 3e
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const uint32_t ta = __funnelshift_r(a[0], a[1], 3 * e), tb = __funnelshift_r(b[0], b[1], 3 * e);
      const uint32_t t = __byte_perm(ta, tb, 0x7340) & 0x07070707u;
      acc[e] = dp2a_lo(pair, t, acc[e]);
      acc[e + 8] = dp2a_hi(pair, t, acc[e + 8]);
    }
  } else {  // byte m of word q holds codes q * CPW + m * CPB + k, k < CPB
    constexpr int CPB = 8 / BITS, CPW = 32 / BITS;
    constexpr uint32_t kMask = 0x01010101u * ((1u << BITS) - 1u);
#pragma unroll
    for (int q = 0; q < NW; ++q)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int o = q * CPW + 2 * h * CPB;  // outputs o + k (bytes 0, 1) and o + CPB + k (bytes 2, 3)
        if (o >= 16) continue;
        const uint32_t p = __byte_perm(a[q], b[q], h ? 0x7362 : 0x5140);
#pragma unroll
        for (int k = 0; k < CPB; ++k) {
          const uint32_t t = BITS == 8 ? p : (p >> (BITS * k)) & kMask;
          acc[o + k] = dp2a_lo(pair, t, acc[o + k]);
          acc[o + CPB + k] = dp2a_hi(pair, t, acc[o + CPB + k]);
        }
      }
  }
}

// Two int16 multipliers in one word (m_a low): each m * inv rounded, |m * inv| <= 32767.
__device__ __forceinline__ uint32_t int16_pair(float ma, float mb, float inv) {
  return (static_cast<uint32_t>(__float2int_rn(ma * inv)) & 0xffffu) |
         static_cast<uint32_t>(__float2int_rn(mb * inv)) << 16;
}

// Sums NV per-lane values over the warp with a halving exchange (NV power of two). Afterwards, for NV >= 32, lane l
// holds the totals of values [l * NV / 32, (l + 1) * NV / 32) in v[0 .. NV / 32); for NV < 32, every lane holds the
// total of value l >> (5 - log2 NV) in v[0].
template <int LEN, int M, int NV>
__device__ __forceinline__ void warp_reduce_scatter(float (&v)[NV], int lane) {
  if constexpr (M >= 1) {
    if constexpr (LEN > 1) {
      constexpr int kHalf = LEN / 2;
      const bool upper = (lane & M) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, M);
      }
      warp_reduce_scatter<kHalf, M / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], M);
      warp_reduce_scatter<1, M / 2>(v, lane);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Stage 1: shrink
// ------------------------------------------------------------------------------------------------------------------

struct ShrinkArgs {
  const void* x;             // (R, n) scalar_t
  int R, n;
  const float* w;            // (R, K) gate weights
  int K;
  const int32_t* words;      // v_words
  const __half* scale;       // v_scale
  const __half* offset;      // v_offset
  const float* s;            // (J,)
  const int32_t* rows;       // (J, 8)
  int J;
  int ntiles;                // row tiles
  int kb_cta;                // 32-code blocks of K per CTA (a multiple of shrink_opl)
  int ktb;                   // blocks per shared-memory x tile (a multiple of shrink_opl, <= kb_cta)
  float* sw;                 // (ntiles, J, R_TILE): s[j] * w[r, delta(j)], 0 for rows past R or invalid rank rows
  float* tpart;              // (KS, ntiles, J, R_TILE): partial sum_k x[r, k] * V[j, k]; written for active rows only
  int* counters;             // the expand stage's split counters, zeroed here
  int ncounters;
  const int32_t* u_words;    // stage 2's factor, prefetched into L2 here when K == 1
  const __half* u_scale;
  const __half* u_offset;
  int u_nwords, u_nparams;
  // The multi-tenant plan (shrink_ctas) reads the deltas' spans: the CTAs of a row tile take, in turn, the groups
  // holding rows of the deltas its row weighs (active_group).
  const int32_t* spans;      // (P, K + 1)
  int P;
  // Fused form only (else null): (ntiles, gridDim.x) ints, the CTAs of each (row tile, rank-row group) done, counted
  // here for stage 2 (which starts on a group's rows once all gridDim.y of them are) and zeroed by the finish kernel.
  // It also lets the next grids start only once x is complete (the fused base kernel reads it without waiting).
  int* ready;
};

struct RowRef {  // one rank row's packed data: word offset, parameter offset, packed group size (group_code)
  int woff, poff, gp;
};

// Copies x[r0 .. r0 + R_TILE, 32 kb0 .. 32 (kb0 + nunits * OPL / 32)) into shared memory as float, zero beyond R
// and n. Layout: unit z (OPL codes) at z * unit_floats; within it run h (rows h*VW .. h*VW+VW) then code e, one
// VW-vector each. Consecutive threads take consecutive codes: coalesced global reads, conflict-free stores. With
// folded parameters the unit's padding float holds the sum of its x values.
template <typename scalar_t, int R_TILE>
__device__ __forceinline__ void stage_x_tile(float* __restrict__ xs, const scalar_t* __restrict__ x, int R, int n,
                                             int r0, int kb0, int nunits) {
  constexpr int VW = vec_width(R_TILE), H = R_TILE / VW, OPL = shrink_opl(R_TILE), UF = unit_floats(R_TILE);
  const int total = nunits * H * OPL;
  const int k0 = kb0 * 32;
#pragma unroll(R_TILE <= 4 ? 4 : 1)
  for (int t = threadIdx.x; t < total; t += kThreads) {  // small tiles: several iterations' loads in flight at once
    const int e = t % OPL, h = (t / OPL) % H, z = t / (OPL * H);
    const int k = k0 + z * OPL + e;
    float v[VW];
#pragma unroll
    for (int i = 0; i < VW; ++i) {
      const int r = r0 + h * VW + i;
      v[i] = (r < R && k < n) ? load_f32(x + static_cast<size_t>(r) * n + k) : 0.f;
    }
    store_vec<VW>(xs + z * UF + (h * OPL + e) * VW, v);
    if constexpr (fold_params<scalar_t, R_TILE>()) {  // one warp a unit (total is a multiple of 32)
      float sum = v[0];
#pragma unroll
      for (int m = 16; m >= 1; m /= 2) sum += __shfl_xor_sync(kFullMask, sum, m);
      if (e == 0) xs[z * UF + OPL] = sum;
    }
  }
}

// The first unit (z = lane) of a tile for the first width class of the warp's rows, requested before x is staged so
// that the packed words and the x tile are in flight together: raw words and the fp16 (scale, offset) pair.
template <int NJ>
struct Prefetch {
  uint32_t raw[NJ][2];
  uint32_t params[NJ];  // fp16 scale (low half) and offset (high half)
  bool valid;           // false for classes whose lanes need more than 2 words (loaded in the loop)
};

// One x tile for the rank rows of `mask` (a subset of the warp's NJ rows, all of width BITS): lane takes units
// z = lane, lane + 32, ... (unit = OPL codes of block kb0 + z / (32 / OPL)), decodes its codes of each row and
// accumulates acc[jj * R_TILE + r]. Rows outside the mask read nothing and add exact zeros. With use_pre, the first
// unit's words and parameters come from `pre`. FOLD: fold_params.
template <int BITS, int NJ, int R_TILE, bool FOLD, bool PIPE>
__device__ __forceinline__ void shrink_tile(float (&acc)[NJ * R_TILE], const RowRef (&rr)[NJ], unsigned mask,
                                            const int32_t* __restrict__ words, const __half* __restrict__ scale,
                                            const __half* __restrict__ offset, const float* __restrict__ xs, int kb0,
                                            int nunits, int lane, const Prefetch<NJ>& pre, bool use_pre) {
  constexpr int VW = vec_width(R_TILE), H = R_TILE / VW, OPL = shrink_opl(R_TILE), UF = unit_floats(R_TILE);
  constexpr int NU = 32 / OPL, NW = lane_words<BITS, OPL>();
  use_pre = use_pre && NW <= 2 && pre.valid;
  // Adds unit z's products for the rows' aligned words and (mul, add) pairs into acc.
  const auto sum_unit = [&](int z, const uint32_t (&wv)[NJ][NW], const float (&mul)[NJ], const float (&add)[NJ]) {
    const float* xu = xs + z * UF;
    if constexpr (FOLD) {
      float t[NJ];
#pragma unroll
      for (int jj = 0; jj < NJ; ++jj) t[jj] = 0.f;
#pragma unroll
      for (int e = 0; e < OPL; ++e) {
        const float xv = xu[e];
#pragma unroll
        for (int jj = 0; jj < NJ; ++jj) t[jj] = __fmaf_rn(unit_code<BITS>(wv[jj], BITS * e), xv, t[jj]);
      }
      const float xsum = xu[OPL];
#pragma unroll
      for (int jj = 0; jj < NJ; ++jj) acc[jj] = __fmaf_rn(mul[jj], t[jj], __fmaf_rn(add[jj], xsum, acc[jj]));
    } else {
#pragma unroll
      for (int e = 0; e < OPL; ++e) {
        float val[NJ];
#pragma unroll
        for (int jj = 0; jj < NJ; ++jj) val[jj] = __fmaf_rn(unit_code<BITS>(wv[jj], BITS * e), mul[jj], add[jj]);
#pragma unroll
        for (int h = 0; h < H; ++h) {
          float xv[VW];
          load_vec<VW>(xu + (h * OPL + e) * VW, xv);
#pragma unroll
          for (int i = 0; i < VW; ++i)
#pragma unroll
            for (int jj = 0; jj < NJ; ++jj)
              acc[jj * R_TILE + h * VW + i] = __fmaf_rn(val[jj], xv[i], acc[jj * R_TILE + h * VW + i]);
        }
      }
    }
  };
  // PIPE (the multi-tenant plan's one-row tiles), rows of up to 2 bits: each lane requests its next unit before it
  // sums the current one, so that a warp keeps two units' words in flight (two buffers in turn; wider rows spill).
  if constexpr (PIPE && BITS <= 2) {
    // Unit z's raw words and fp16 (scale, offset) pairs for the rows of `mask`; zeros elsewhere (exact zero sums).
    const auto fetch = [&](int z, uint32_t (&w)[NJ][NW], uint32_t (&par)[NJ]) {
      const int gb = kb0 + z / NU, q0 = (z % NU) * OPL;
#pragma unroll
      for (int jj = 0; jj < NJ; ++jj) {
        if (((mask >> jj) & 1u) == 0u) {
#pragma unroll
          for (int q = 0; q < NW; ++q) w[jj][q] = 0u;
          par[jj] = 0u;
        } else {
          load_lane_words<BITS, OPL>(words + rr[jj].woff + gb * BITS, q0, w[jj]);
          par[jj] = load_param_pair(scale, offset, rr[jj].poff + group_index(gb * 32, rr[jj].gp));
        }
      }
    };
    const auto expand_sum = [&](int z, uint32_t (&wv)[NJ][NW], const uint32_t (&par)[NJ]) {
      float mul[NJ], add[NJ];
#pragma unroll
      for (int jj = 0; jj < NJ; ++jj) {
        expand_param_pair<BITS>(par[jj], mul[jj], add[jj]);
        align_lane_words<BITS, OPL>(wv[jj], (z % NU) * OPL);
      }
      sum_unit(z, wv, mul, add);
    };
    uint32_t wa[NJ][NW], pa[NJ], wb[NJ][NW], pb[NJ];
    int z = lane;
    if (z >= nunits) return;
    fetch(z, wa, pa);  // (`pre` is never filled in the multi-tenant plan)
#pragma unroll 1
    for (;;) {
      const bool more = z + 32 < nunits;
      if (more) fetch(z + 32, wb, pb);
      expand_sum(z, wa, pa);
      if (!more) break;
      z += 32;
      const bool more2 = z + 32 < nunits;
      if (more2) fetch(z + 32, wa, pa);
      expand_sum(z, wb, pb);
      if (!more2) break;
      z += 32;
    }
  } else {
#pragma unroll 1
    for (int z = lane; z < nunits; z += 32) {
      const int gb = kb0 + z / NU;   // block of the row
      const int q0 = (z % NU) * OPL;  // first code of the unit within the block
      uint32_t wv[NJ][NW];
      float mul[NJ], add[NJ];
#pragma unroll
      for (int jj = 0; jj < NJ; ++jj) {
        if (((mask >> jj) & 1u) == 0u) {
#pragma unroll
          for (int q = 0; q < NW; ++q) wv[jj][q] = 0u;
          mul[jj] = add[jj] = 0.f;
        } else if (use_pre) {
#pragma unroll
          for (int q = 0; q < NW; ++q) wv[jj][q] = pre.raw[jj][q < 2 ? q : 0];
          expand_param_pair<BITS>(pre.params[jj], mul[jj], add[jj]);
        } else {
          load_lane_words<BITS, OPL>(words + rr[jj].woff + gb * BITS, q0, wv[jj]);
          load_params<BITS>(scale, offset, rr[jj].poff + group_index(gb * 32, rr[jj].gp), mul[jj],
                            add[jj]);
        }
        align_lane_words<BITS, OPL>(wv[jj], q0);
      }
      use_pre = false;
      sum_unit(z, wv, mul, add);
    }
  }
}

template <int NJ, int R_TILE, bool FOLD, bool PIPE>
__device__ __forceinline__ void shrink_tile_any(int bits, float (&acc)[NJ * R_TILE], const RowRef (&rr)[NJ],
                                                unsigned mask, const ShrinkArgs& a, const float* xs, int kb0,
                                                int nunits, int lane, const Prefetch<NJ>& pre, bool use_pre) {
  with_width(bits, [&](auto B) {
    shrink_tile<decltype(B)::value, NJ, R_TILE, FOLD, PIPE>(acc, rr, mask, a.words, a.scale, a.offset, xs, kb0,
                                                            nunits, lane, pre, use_pre);
  });
}

// Rows of `todo` with the width of its lowest row (one pass over a tile serves them all).
template <int NJ>
__device__ __forceinline__ unsigned width_class(unsigned todo, const int (&rbits)[NJ], int bits) {
  unsigned mask = 0u;
#pragma unroll
  for (int jj = 0; jj < NJ; ++jj)
    if (((todo >> jj) & 1u) && rbits[jj] == bits) mask |= 1u << jj;
  return mask;
}

// The first unit (z = lane) of the tile at block kb0 for the rows of `mask` (all of width `bits`), into `pre`.
template <int NJ, int OPL>
__device__ __forceinline__ void prefetch_first_unit(Prefetch<NJ>& pre, const ShrinkArgs& a, const RowRef (&rr)[NJ],
                                                    unsigned mask, int bits, int kb0, int nunits, int lane) {
  pre.valid = false;
  if (lane >= nunits) return;
  const int gb = kb0 + lane / (32 / OPL), q0 = (lane % (32 / OPL)) * OPL;
#pragma unroll
  for (int jj = 0; jj < NJ; ++jj) {
    pre.params[jj] = 0u;
    if ((mask >> jj) & 1u) {
      pre.valid = prefetch_lane_words<OPL>(a.words + rr[jj].woff + gb * bits, bits, q0, pre.raw[jj]);
      if (pre.valid) pre.params[jj] = load_param_pair(a.scale, a.offset, rr[jj].poff + group_index(gb * 32, rr[jj].gp));
    }
  }
}

#if defined(DELTACOMP_ROW_TRACE) || defined(DELTACOMP_SHRINK_TRACE)
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif

#ifdef DELTACOMP_SHRINK_TRACE
// Timing build only (check_standalone --stages on a multi-tenant plan): thread 0 of each CTA of the multi-tenant stage
// 1 (shrink_kernel's SPARSE form) adds the %globaltimer time since its last mark to the phase it ends. The phases:
// - kTraceWait: the wait for the kernels ahead and the counters' zeroing;
// - per group: finding it (table_group, or active_group) and requesting its rows' records; the records landed and the
//   rows' weights, up to the CTA barrier, which also waits for the other warps' previous group; staging x; decoding
//   warp 0's rows; storing.
// g_shrink_trace[cta][0 .. kShrinkTraceFields): those six sums in ns, the groups walked, the SM's index plus one, and
// the entry and exit times.
enum { kTraceWait, kTraceFind, kTraceMeta, kTraceStage, kTraceDecode, kTraceStore, kTraceGroups, kTraceSm,
       kTraceEntry, kTraceExit, kShrinkTraceFields };
__device__ unsigned long long* g_shrink_trace = nullptr;
#define SHRINK_PHASE(k)                              \
  if (SPARSE && threadIdx.x == 0) {                  \
    const unsigned long long now_ = global_ns();     \
    trace_[k] += now_ - trace_at_;                   \
    trace_at_ = now_;                                \
  }
#else
#define SHRINK_PHASE(k)
#endif

// Asynchronous copies into shared memory (cp.async): 16 bytes (both addresses 16-byte aligned; bypassing L1) and 4.
__device__ __forceinline__ void copy_async16(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_async4(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(src) : "memory");
}

// The ranges of groups of 32 rank rows (bank order) that hold rows of the deltas row `row` weighs (K <= 32), in bank
// order, a pass of 32 (projection, delta) pairs at a time: per pass every lane calls visit(first, cnt, start) with its
// pair's first group, group count (0: none) and the groups of the pairs before it, and the walk stops once visit
// returns true (the same on every lane). The deltas' rows in each projection are consecutive ranges in bank order; a
// group shared by several such ranges belongs to the first.
template <typename F>
__device__ __forceinline__ void scan_active_ranges(const ShrinkArgs& a, int row, int lane, F&& visit) {
  const float* wr = a.w + static_cast<size_t>(row) * a.K;
  const unsigned used = __ballot_sync(kFullMask, lane < a.K && __ldg(wr + lane) != 0.f);
  int seen_hi = 0, seen = 0;  // over the ranges before this pass: the end of the last non-empty one, and their groups
  for (int q0 = 0; q0 < a.P * a.K; q0 += 32) {
    const int q = q0 + lane, p = q / a.K, d = q % a.K;
    int lo = 0, hi = 0;
    if (q < a.P * a.K && ((used >> d) & 1u)) {
      const int32_t* sp = a.spans + static_cast<size_t>(p) * (a.K + 1) + d;
      lo = max(0, __ldg(sp)), hi = min(a.J, __ldg(sp + 1));
    }
    const bool any = hi > lo;
    int end = any ? hi : 0;  // inclusive running maximum of the ends
#pragma unroll
    for (int m = 1; m < 32; m *= 2) end = max(end, __shfl_up_sync(kFullMask, end, m) * (lane >= m));
    const int prev = __shfl_up_sync(kFullMask, end, 1);
    const int before = max(seen_hi, lane > 0 ? prev : 0);
    const int first = (lo >> 5) + (any && before > (lo & ~31) ? 1 : 0), last = (hi - 1) >> 5;
    const int cnt = any && last >= first ? last - first + 1 : 0;
    int incl = cnt;  // inclusive prefix sum of the counts
#pragma unroll
    for (int m = 1; m < 32; m *= 2) {
      const int t = __shfl_up_sync(kFullMask, incl, m);
      if (lane >= m) incl += t;
    }
    if (visit(first, cnt, seen + incl - cnt)) return;
    seen_hi = max(seen_hi, __shfl_sync(kFullMask, end, 31));
    seen += __shfl_sync(kFullMask, incl, 31);
  }
}

// The g-th group of scan_active_ranges' ranges, or -1 when there are fewer (every warp finds it alone).
__device__ __forceinline__ int active_group(const ShrinkArgs& a, int row, int g, int lane) {
  int jg = -1;
  scan_active_ranges(a, row, lane, [&](int first, int cnt, int start) {
    const unsigned hit = __ballot_sync(kFullMask, cnt > 0 && g >= start && g < start + cnt);
    if (hit != 0u) jg = __shfl_sync(kFullMask, first + g - start, __ffs(hit) - 1);
    return hit != 0u;
  });
  return jg;
}

// A multi-tenant CTA's ranges in shared memory (one warp, once): the first group of each non-empty range and the
// groups before it, then the total (first[0 .. n), start[0 .. n]). Returns n, or -1 past kRangeTable ranges (the CTA
// then finds each group with active_group).
constexpr int kRangeTable = 64;
__device__ __forceinline__ int range_table(const ShrinkArgs& a, int row, int lane, int* first_of, int* start_of) {
  int n = 0, total = 0;
  scan_active_ranges(a, row, lane, [&](int first, int cnt, int start) {
    const unsigned has = __ballot_sync(kFullMask, cnt > 0);
    const int idx = n + __popc(has & ((1u << lane) - 1u));
    if (cnt > 0 && idx < kRangeTable) first_of[idx] = first, start_of[idx] = start;
    n += __popc(has);
    total = max(total, __reduce_max_sync(kFullMask, cnt > 0 ? start + cnt : 0));
    return false;
  });
  if (n > kRangeTable) return -1;
  if (lane == 0) start_of[n] = total;
  return n;
}

// The g-th group from range_table's n ranges, or -1.
__device__ __forceinline__ int table_group(const int* first_of, const int* start_of, int n, int g, int lane) {
  for (int i0 = 0; i0 < n; i0 += 32) {
    const int i = i0 + lane;
    const bool in = i < n && g >= start_of[i] && g < start_of[i + 1];
    const unsigned hit = __ballot_sync(kFullMask, in);
    if (hit != 0u) return __shfl_sync(kFullMask, in ? first_of[i] + g - start_of[i] : 0, __ffs(hit) - 1);
  }
  return -1;
}

// grid (ceil(J / kRowsPerCta), KS, ntiles), block kThreads, dynamic shared memory ktb * block_floats(R_TILE) floats.
// Warp w of CTA (gx, ks, rt) owns rank rows j = (gx * kWarps + w) * 4 + [0, 4), token rows rt * R_TILE + [0, R_TILE)
// and K blocks [ks * kb_cta, (ks + 1) * kb_cta). Lane l < 4 keeps row jbase + l's metadata; others read it by shuffle.
// SPARSE (the multi-tenant plan, shrink_ctas; R_TILE 1, an instantiation of its own so that the others keep their
// registers): grid (shrink_ctas, KS, ntiles), and CTA gx takes the g-th groups of its row for g = gx, gx + gridDim.x,
// ... (from a table of the row's ranges built once a CTA: range_table, table_group), each as above. Each group's row
// records and s[j] are copied into shared memory (cp.async) while the group before is computed, and the row's gate
// weights are read once a CTA.
//
// Before waiting for the kernels ahead of it, the CTA reads its rows' metadata and, with a single delta (K == 1, so
// every valid row is active unless all its weights are zero), requests the first unit of packed words and asks L2
// for its share of stage 2's factor.
template <typename scalar_t, int R_TILE, bool SPARSE = false>
__global__ void __launch_bounds__(kThreads, shrink_min_ctas(R_TILE)) shrink_kernel(const ShrinkArgs a) {
  static_assert(!SPARSE || R_TILE == 1, "the multi-tenant plan tiles one row");
  extern __shared__ float4 shrink_smem[];
  float* xs = reinterpret_cast<float*>(shrink_smem);
  float* row_w = nullptr;  // SPARSE: the row's gate weights (K <= 32), in shared memory
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  if (a.ready == nullptr) allow_next_grid();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ks = blockIdx.y, rt = blockIdx.z, r0 = rt * R_TILE;
  const size_t cta = blockIdx.x + static_cast<size_t>(gridDim.x) * (blockIdx.y + static_cast<size_t>(gridDim.y) *
                                                                                      blockIdx.z);
  const size_t ctas = static_cast<size_t>(gridDim.x) * gridDim.y * gridDim.z;
  const size_t groups = (static_cast<size_t>(a.J) + kRowsPerCta - 1) / kRowsPerCta;
#ifdef DELTACOMP_SHRINK_TRACE
  unsigned long long trace_[kShrinkTraceFields] = {}, trace_at_ = global_ns();
  trace_[kTraceEntry] = trace_at_;
#endif

  // Row metadata of group jg (lanes 0..3); invalid rows (past J, unknown width, delta out of range) get bits = 0.
  // The warp's rows, gathered from lanes 0..3. The active rows fall into width classes; each class is one pass over a
  // tile with all its rows sharing every x load (usually a single class of four).
  int jbase = 0, m_bits = 0, m_delta = 0;
  float m_s = 0.f;  // SPARSE: s[j] of lane j's row, fetched with its metadata
  RowRef rr[kRowsPerWarp];
  int rbits[kRowsPerWarp];
  unsigned valid = 0u;
  // Lane l < 4's row of group jg: its fields as read (fetch; the multi-tenant plan copies them in ahead instead:
  // fetch_async), then checked and handed to the warp (install).
  struct RowMeta {
    int bits = 0, woff = 0, poff = 0, delta = 0, gs = 0;
    float s = 0.f;
  };
  const auto fetch = [&](int jg) {
    RowMeta m;
    const int j = (jg * kWarps + warp) * kRowsPerWarp + lane;
    if (lane < kRowsPerWarp && j < a.J) {
      const int32_t* rw = a.rows + static_cast<size_t>(j) * 8;
      m.bits = __ldg(rw + 0), m.woff = __ldg(rw + 1), m.poff = __ldg(rw + 2), m.delta = __ldg(rw + 6);
      m.gs = __ldg(rw + 7);
    }
    return m;
  };
  const auto install = [&](int jg, const RowMeta& m) {
    jbase = (jg * kWarps + warp) * kRowsPerWarp;
    m_bits = m.bits, m_delta = m.delta, m_s = m.s;
    if (!valid_bits(m_bits) || m_delta < 0 || m_delta >= a.K) m_bits = 0;
    const int m_gp = group_code(m.gs);
    valid = 0u;
#pragma unroll
    for (int jj = 0; jj < kRowsPerWarp; ++jj) {
      rr[jj].woff = __shfl_sync(kFullMask, m.woff, jj);
      rr[jj].poff = __shfl_sync(kFullMask, m.poff, jj);
      rr[jj].gp = __shfl_sync(kFullMask, m_gp, jj);
      rbits[jj] = __shfl_sync(kFullMask, m_bits, jj);
      if (rbits[jj] != 0) valid |= 1u << jj;
    }
  };
  const auto load_group = [&](int jg) { install(jg, fetch(jg)); };
  // SPARSE: the same fields copied into shared memory without waiting (cp.async: the row's 32-byte record and s[j]),
  // then read once they have landed; no registers are held while the group before is computed.
  // This lane's slot of 12 ints in buffer 0 (the row's 8 fields, then s; set where SPARSE starts). Groups use the two
  // buffers in turn, so that no copy lands where the group before is still being read.
  constexpr int kMetaBuf = kWarps * kRowsPerWarp * 12;
  int* my_meta = nullptr;
  const auto fetch_async = [&](int jg, int buf) {
    int* slot = my_meta + buf * kMetaBuf;
    const int j = (jg * kWarps + warp) * kRowsPerWarp + lane;
    if (lane >= kRowsPerWarp) return;
    if (j < a.J) {
      copy_async16(slot, a.rows + static_cast<size_t>(j) * 8);
      copy_async16(slot + 4, a.rows + static_cast<size_t>(j) * 8 + 4);
      copy_async4(slot + 8, a.s + j);
      asm volatile("cp.async.commit_group;" ::: "memory");
    } else {
      slot[0] = 0;  // no row: bits 0
    }
  };
  const auto landed = [&](int buf) {
    const int* slot = my_meta + buf * kMetaBuf;
    RowMeta m;
    asm volatile("cp.async.wait_all;" ::: "memory");
    if (lane < kRowsPerWarp) {
      m.bits = slot[0], m.woff = slot[1], m.poff = slot[2], m.delta = slot[6], m.gs = slot[7];
      m.s = __int_as_float(slot[8]);
    }
    return m;
  };

  constexpr int OPL = shrink_opl(R_TILE), NU = 32 / OPL;  // codes per unit, units per block
  constexpr bool FOLD = fold_params<scalar_t, R_TILE>();
  const int nblk = (a.n + 31) >> 5;
  const int kbeg = ks * a.kb_cta, kend = min(nblk, kbeg + a.kb_cta);
  // One delta: the active rows are the valid rows, or none. The first unit is requested early only for small row
  // tiles, where the registers it holds across the wait are free (16-row tiles would spill).
  const bool early = R_TILE <= 4 && a.K == 1 && !SPARSE;
  Prefetch<kRowsPerWarp> pre;
  pre.valid = false;
  if constexpr (!SPARSE) load_group(blockIdx.x);
  if (a.K == 1) {
    prefetch_share_l2(a.u_words, static_cast<size_t>(a.u_nwords) * 4, cta, ctas);
    prefetch_share_l2(a.u_scale, static_cast<size_t>(a.u_nparams) * 2, cta, ctas);
    prefetch_share_l2(a.u_offset, static_cast<size_t>(a.u_nparams) * 2, cta, ctas);
  }
  if (early) {
    if (valid != 0u && kbeg < kend) {
      const int bits0 = __shfl_sync(kFullMask, m_bits, __ffs(valid) - 1);
      prefetch_first_unit<kRowsPerWarp, OPL>(pre, a, rr, width_class(valid, rbits, bits0), bits0, kbeg,
                                             min(a.ktb, kend - kbeg) * NU, lane);
    }
  }
  wait_prior_grids();
  if (a.ready != nullptr) allow_next_grid();
  // The first x tile is read while the weights below are; the barrier after them publishes it.
  if (early && kbeg < kend)
    stage_x_tile<scalar_t, R_TILE>(xs, x, a.R, a.n, r0, kbeg, min(a.ktb, kend - kbeg) * NU);

  // Zero the expand stage's split counters (it runs after this kernel on the same stream).
  for (size_t i = cta * kThreads + threadIdx.x; i < static_cast<size_t>(a.ncounters); i += ctas * kThreads)
    a.counters[i] = 0;
  SHRINK_PHASE(kTraceWait);

  // Group jg (loaded by load_group) of row tile rt on K slice ks.
  bool staged = false;  // the x tile in shared memory is the one every group of this CTA reads
  const auto run_group = [&](int jg) {
    const size_t done = rt * groups + jg;
    // Activity per rank row (bit jj): some token row of the tile has a non-zero weight for the row's delta.
    // The K slice 0 CTA also writes sw for every rank row of the group (the expand stage reads it for every row of
    // the deltas the tile weighs).
    unsigned act = 0;
#pragma unroll
    for (int jj = 0; jj < kRowsPerWarp; ++jj) {
      const int delta = __shfl_sync(kFullMask, m_delta, jj);
      const int j = jbase + jj;
      float wt = 0.f;
      if constexpr (SPARSE) {  // the row's weights are in shared memory, s[j] came with the metadata
        const float sj = __shfl_sync(kFullMask, m_s, jj);
        if (rbits[jj] != 0) wt = row_w[delta];
        if (wt != 0.f) act |= 1u << jj;
        if (ks == 0 && j < a.J && lane == 0) a.sw[static_cast<size_t>(rt) * a.J + j] = rbits[jj] != 0 ? wt * sj : 0.f;
      } else {
        if (rbits[jj] != 0 && lane < R_TILE && r0 + lane < a.R)
          wt = __ldg(a.w + static_cast<size_t>(r0 + lane) * a.K + delta);
        if (__ballot_sync(kFullMask, wt != 0.f) != 0u) act |= 1u << jj;
        if (ks == 0 && j < a.J && lane < R_TILE)
          a.sw[(static_cast<size_t>(rt) * a.J + j) * R_TILE + lane] = rbits[jj] != 0 ? wt * __ldg(a.s + j) : 0.f;
      }
    }
    if (__syncthreads_or(act != 0u) == 0) {  // nothing active in this group: read no x (and, K > 1, no words)
      count_done(a.ready, done);
      SHRINK_PHASE(kTraceMeta);
      return;
    }
    SHRINK_PHASE(kTraceMeta);

    const int bits0 = act != 0u ? __shfl_sync(kFullMask, m_bits, __ffs(act) - 1) : 0;
    const unsigned mask0 = width_class(act, rbits, bits0);  // with K == 1: act == valid, so `pre` holds this class

    constexpr int NV = kRowsPerWarp * R_TILE;
    float acc[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) acc[i] = 0.f;

    for (int kb0 = kbeg; kb0 < kend; kb0 += a.ktb) {
      const int nunits = min(a.ktb, kend - kb0) * NU;
      if (!early || kb0 != kbeg) {  // (else the words and the x tile were requested before the weights)
        // (not in the multi-tenant plan: its pipelined tiles request their first unit themselves, and the registers
        // `pre` would hold across the tile are the ones the pipeline needs)
        if constexpr (!SPARSE) prefetch_first_unit<kRowsPerWarp, OPL>(pre, a, rr, mask0, bits0, kb0, nunits, lane);
        if (!staged) {
          __syncthreads();  // the previous tile is no longer read
          stage_x_tile<scalar_t, R_TILE>(xs, x, a.R, a.n, r0, kb0, nunits);
          __syncthreads();
        }
        staged = SPARSE && kend - kbeg <= a.ktb;  // the CTA's one tile serves its later groups (same row and slice)
      }
      SHRINK_PHASE(kTraceStage);
      bool use_pre = true;
      for (unsigned todo = act; todo != 0u; use_pre = false) {
        const int bits = __shfl_sync(kFullMask, m_bits, __ffs(todo) - 1);
        const unsigned mask = width_class(todo, rbits, bits);
        shrink_tile_any<kRowsPerWarp, R_TILE, FOLD, SPARSE>(bits, acc, rr, mask, a, xs, kb0, nunits, lane, pre,
                                                            use_pre);
        todo &= ~mask;
      }
      SHRINK_PHASE(kTraceDecode);
    }

    // Warp totals, then one store per (rank row, token row) of active rows: tpart[ks][rt][j][r].
    if (act != 0u) {
      warp_reduce_scatter<NV, 16>(acc, lane);
      constexpr int PER = NV >= 32 ? NV / 32 : 1;
      float* dst = a.tpart + (static_cast<size_t>(ks) * a.ntiles + rt) * a.J * R_TILE;
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const int idx = NV >= 32 ? lane * PER + i : lane >> (5 - ilog2(NV));
        const bool owner = NV >= 32 || (lane & (32 / NV - 1)) == 0;
        const int jj = idx / R_TILE, r = idx % R_TILE;
        if (owner && ((act >> jj) & 1u)) dst[static_cast<size_t>(jbase + jj) * R_TILE + r] = acc[i];
      }
    }
    count_done(a.ready, done);
    SHRINK_PHASE(kTraceStore);
  };

  if constexpr (!SPARSE) {
    run_group(blockIdx.x);
  } else {
    // The row's groups (range_table) and weights, once a CTA; each group's rows are fetched during the one before.
    __shared__ int first_of[kRangeTable], start_of[kRangeTable + 1], nranges;
    __shared__ __align__(16) int meta_buf[2 * kMetaBuf];
    __shared__ float weights[32];
    my_meta = meta_buf + (warp * kRowsPerWarp + (lane & (kRowsPerWarp - 1))) * 12;
    row_w = weights;
    if (warp == 0) {
      const int nr = range_table(a, r0, lane, first_of, start_of);
      if (lane == 0) nranges = nr;
      if (lane < a.K) row_w[lane] = __ldg(a.w + static_cast<size_t>(r0) * a.K + lane);
    }
    __syncthreads();
    const int nr = nranges;
    const auto find = [&](int g) {
      return nr >= 0 ? table_group(first_of, start_of, nr, g, lane) : active_group(a, r0, g, lane);
    };
    int g = blockIdx.x, jg = find(g), buf = 0;
    if (jg >= 0) fetch_async(jg, buf);
    SHRINK_PHASE(kTraceFind);
    while (jg >= 0) {
      install(jg, landed(buf));
      const int jn = find(g + static_cast<int>(gridDim.x));
      if (jn >= 0) fetch_async(jn, buf ^ 1);
      SHRINK_PHASE(kTraceFind);
      run_group(jg);
#ifdef DELTACOMP_SHRINK_TRACE
      ++trace_[kTraceGroups];
#endif
      g += gridDim.x, jg = jn, buf ^= 1;
    }
#ifdef DELTACOMP_SHRINK_TRACE
    if (threadIdx.x == 0 && g_shrink_trace != nullptr) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      trace_[kTraceSm] = sm + 1, trace_[kTraceExit] = global_ns();
      for (int k = 0; k < kShrinkTraceFields; ++k) g_shrink_trace[cta * kShrinkTraceFields + k] = trace_[k];
    }
#endif
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Stage 2: expand
// ------------------------------------------------------------------------------------------------------------------

constexpr int kMaxBaseProjs = 8;  // projections of a bank whose base weights one fused call can take

struct ExpandArgs {
  const void* y;             // (R, M) scalar_t (the fused form's splits, which only store planes, never read it)
  void* out;                 // (R, M) scalar_t
  float* part;               // (nsplit, R, M) fp32 partials, used when nsplit > 1
  int* counters;             // (ntiles, slots) finished splits per output tile, zeroed by stage 1
  int R, M;
  const int32_t* words;      // u_words
  const __half* scale;       // u_scale
  const __half* offset;      // u_offset
  const int32_t* rows;       // (J, 8)
  const int32_t* projs;      // (P, 4)
  const int32_t* spans;      // (P, K + 1): delta d's rank rows in projection p are [spans[p][d], spans[p][d + 1])
  const float* w;            // (R, K) gate weights
  int P, J, K;
  const float* sw;           // (ntiles, J, R_TILE), from stage 1
  const float* tpart;        // (KS, ntiles, J, R_TILE), from stage 1
  int ks, ntiles, nsplit;
  // Fused form (delta_linear_base_launch): every split stores its fp32 partial tile and stops; the finish kernel
  // writes out. Rows are read once their group is counted done in stage 1's `ready` (null otherwise: the whole of
  // stage 1 is waited for).
  int planes_only;
  const int* ready;
};

// Floats per rank row in a warp's staged c values (padded so that 8 lanes storing float4s hit distinct banks).
__host__ __device__ constexpr int c_pitch(int r_tile) { return r_tile >= 8 ? r_tile + 4 : r_tile; }

// Shared memory of the expand stage: first each warp's staged c values (32 rank rows x c_pitch), then, after a barrier,
// the cross-warp reduction (4 warps x R_TILE * OPL values x 32 lanes) and the CTA's output tile.
__host__ __device__ constexpr int expand_smem_floats(int r_tile) {
  return kWarps * 32 * c_pitch(r_tile) > kWarps / 2 * r_tile * expand_opl(r_tile) * 32
             ? kWarps * 32 * c_pitch(r_tile)
             : kWarps / 2 * r_tile * expand_opl(r_tile) * 32;
}

// Rank rows whose words a lane requests at once in the expand stage (bounded by the registers left next to the
// R_TILE x OPL accumulators).
__host__ __device__ constexpr int expand_run_max(int nw, int r_tile) {
  return clamp_int((r_tile >= 8 ? 8 : 16) / nw, 1, 8);
}

// Descriptor of a staged rank row, held by lane (j - jb) of the warp and read by shuffle.
struct RowDesc {
  int bits, woff, poff, gp;  // bits = 0: skip the row; gp: group_code of the group size
};

// A run of up to JB consecutive staged rank rows of the same width starting at staged row i (n rows available): all
// their words are requested before any is decoded, so JB loads per lane are in flight. Returns the rows consumed.
// FOLD (fold_params): the lane's OPL outputs share a parameter group, so c add goes into cadd, which the caller adds
// to each of them. INT (with FOLD; OPL = 16): the codes go as integer products (pair_products), in runs of up to 8
// rows: the run's multipliers c scale are rounded to int16 against the largest of them (an error of at most 1.5e-5 of
// that one), its sums are exact in int32 and scaled once a run.
template <int BITS, int R_TILE, int OPL, bool FOLD, bool INT>
__device__ __forceinline__ int expand_run(float (&acc)[R_TILE * OPL], float& cadd, const RowDesc& d, const float* cw,
                                          int i, int n, const ExpandArgs& a, bool has, int bi, int q0) {
  constexpr int NW = lane_words<BITS, OPL>(), CP = c_pitch(R_TILE);
  constexpr int JB = INT ? clamp_int(8 / NW, 2, 8) : expand_run_max(NW, R_TILE);
  static_assert(!INT || (FOLD && OPL == 16 && JB % 2 == 0), "integer products: pairs of 16-code rows, folded");
  const int nn = min(n, JB);
  uint32_t wv[JB][NW], pair[JB];
#pragma unroll
  for (int b = 0; b < JB; ++b) {
    const int src = b < nn ? i + b : i;
    const int woff = __shfl_sync(kFullMask, d.woff, src), poff = __shfl_sync(kFullMask, d.poff, src);
    const int gp = __shfl_sync(kFullMask, d.gp, src);
#pragma unroll
    for (int q = 0; q < NW; ++q) wv[b][q] = 0u;
    pair[b] = 0u;
    if (b < nn && has) {
      load_lane_words<BITS, OPL>(a.words + woff + bi * BITS, q0, wv[b]);
      pair[b] = load_param_pair(a.scale, a.offset, poff + group_index(bi * 32, gp));
    }
  }
  if constexpr (INT) {
    float cm[JB], big = 0.f;
#pragma unroll
    for (int b = 0; b < JB; ++b) {
      cm[b] = 0.f;
      if (b < nn) {
        align_lane_words<BITS, OPL>(wv[b], q0);
        const float c = cw[(i + b) * CP];
        cm[b] = c * pair_scale(pair[b]);
        cadd = __fmaf_rn(c, pair_offset(pair[b]), cadd);
        big = fmaxf(big, fabsf(cm[b]));
      }
    }
    const float inv = big > 0.f ? 32767.f / big : 0.f, unit = big * (1.f / 32767.f);
    int iacc[OPL];
#pragma unroll
    for (int e = 0; e < OPL; ++e) iacc[e] = 0;
#pragma unroll
    for (int b = 0; b < JB; b += 2)  // a row past nn has no words and multiplier 0
      if (b < nn) pair_products<BITS>(iacc, wv[b], wv[b + 1], int16_pair(cm[b], cm[b + 1], inv));
#pragma unroll
    for (int e = 0; e < OPL; ++e) acc[e] = __fmaf_rn(static_cast<float>(iacc[e]), unit, acc[e]);
  } else {
#pragma unroll
    for (int b = 0; b < JB; ++b) {
      if (b < nn) {
        align_lane_words<BITS, OPL>(wv[b], q0);
        float mul, add;
        expand_param_pair<BITS>(pair[b], mul, add);
        float cr[R_TILE];
        load_vec<R_TILE>(cw + (i + b) * CP, cr);
        if constexpr (FOLD) {
          const float cm = cr[0] * mul;
          cadd = __fmaf_rn(cr[0], add, cadd);
#pragma unroll
          for (int e = 0; e < OPL; ++e) acc[e] = __fmaf_rn(unit_code<BITS>(wv[b], BITS * e), cm, acc[e]);
        } else {
#pragma unroll
          for (int e = 0; e < OPL; ++e) {
            const float val = __fmaf_rn(unit_code<BITS>(wv[b], BITS * e), mul, add);
#pragma unroll
            for (int r = 0; r < R_TILE; ++r) acc[r * OPL + e] = __fmaf_rn(cr[r], val, acc[r * OPL + e]);
          }
        }
      }
    }
  }
  return nn;
}

// Eight (or four, fp32) consecutive elements of x or a base weight row as floats, from one 16-byte word.
template <typename scalar_t>
__device__ __forceinline__ void unpack16(const uint4& u, float (&f)[16 / sizeof(scalar_t)]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(scalar_t) == 4) {
      f[i] = __uint_as_float(w[i]);
    } else if constexpr (std::is_same_v<scalar_t, __half>) {
      f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    } else {  // bfloat16: the upper half of a float
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
}

// 16-byte loads in flight per warp in the base product. Measured on an H200 at Llama-2-7B shapes, 1 row, bf16, with the
// inputs split in two (kBaseSplits), per fused call (cuda/check_standalone.cu --fused; q|k|v, o, gate|up, down): 4
// gave 46.1, 26.6, 69.6, 46.2 us against 48.4, 27.4, 71.4, 44.5 for 8, and the base product alone 28.5, 11.0, 46.1,
// 24.4 against 31.7, 12.0, 48.0, 26.8.
constexpr int kBaseLoads = 4;

// NO dot products of weight rows w[0, nw) over inputs [k_lo, k_hi) (k_lo a multiple of 16 bytes' elements), for
// token rows [0, rows) of the tile (rows <= R_TILE): acc[i][r] = sum_k x_r[k] * w[i][k] in fp32, the sums in every
// lane. The lanes stride over k with 16-byte loads, LOADS / NO per row in flight (with vec; otherwise one element at a
// time). x_vec(r, k, xv) fetches row r's 16 bytes' worth of inputs from k as floats, x_one(r, k) one input.
template <typename scalar_t, int NO, int R_TILE, int LOADS, typename XVec, typename XOne>
__device__ __forceinline__ void dot_rows(float (&acc)[NO][R_TILE], const scalar_t* const (&w)[NO], int nw, int rows,
                                         int k_lo, int k_hi, bool vec, int lane, const XVec& x_vec,
                                         const XOne& x_one) {
  constexpr int VEC = 16 / sizeof(scalar_t), U = LOADS / NO, STEP = 32 * VEC;
  static_assert(NO <= LOADS && LOADS % NO == 0, "whole loads per row in flight");
#pragma unroll
  for (int i = 0; i < NO; ++i)
#pragma unroll
    for (int r = 0; r < R_TILE; ++r) acc[i][r] = 0.f;
  if (vec) {
    for (int k0 = k_lo + lane * VEC; k0 < k_hi; k0 += U * STEP) {
      uint4 a[NO][U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = k0 + u * STEP;
#pragma unroll
        for (int i = 0; i < NO; ++i)
          a[i][u] = k < k_hi && i < nw ? __ldg(reinterpret_cast<const uint4*>(w[i] + k)) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = k0 + u * STEP;
        if (k >= k_hi) break;
        float f[NO][VEC];
#pragma unroll
        for (int i = 0; i < NO; ++i) unpack16<scalar_t>(a[i][u], f[i]);
#pragma unroll
        for (int r = 0; r < R_TILE; ++r) {
          if (r >= rows) break;
          float xv[VEC];
          x_vec(r, k, xv);
#pragma unroll
          for (int e = 0; e < VEC; ++e)
#pragma unroll
            for (int i = 0; i < NO; ++i) acc[i][r] = __fmaf_rn(f[i][e], xv[e], acc[i][r]);
        }
      }
    }
  } else {
    for (int k = k_lo + lane; k < k_hi; k += 32) {
      float f[NO];
#pragma unroll
      for (int i = 0; i < NO; ++i) f[i] = i < nw ? load_f32(w[i] + k) : 0.f;
#pragma unroll
      for (int r = 0; r < R_TILE; ++r) {
        if (r >= rows) break;
        const float xv = x_one(r, k);
#pragma unroll
        for (int i = 0; i < NO; ++i) acc[i][r] = __fmaf_rn(f[i], xv, acc[i][r]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < NO; ++i)
#pragma unroll
    for (int r = 0; r < R_TILE; ++r)
#pragma unroll
      for (int m = 16; m >= 1; m /= 2) acc[i][r] += __shfl_xor_sync(kFullMask, acc[i][r], m);
}

// Number of consecutive set bits of m from bit i on.
__device__ __forceinline__ int run_length(unsigned m, int i) {
  const unsigned rest = ~(m >> i);
  return rest == 0u ? 32 - i : __ffs(rest) - 1;
}

// grid (slots, nsplit, ntiles), block kThreads. Slot s is the s-th W2-output slice counting over the projections in
// order (slots past the last slice exit). The CTA owns outputs [o0, o0 + W2) of its projection (lane l: outputs
// l * OPL + [0, OPL), inside one 32-code block), token rows rt * R_TILE + [0, R_TILE) and split `split` of the
// projection's rank rows. Each warp walks its own contiguous share of those rank rows without block-wide barriers:
// 32 descriptors at a time (lane t loads rank row jb + t: metadata, c = sw * sum_ks tpart), then runs of equal width.
// The 8 warps' tiles are summed through shared memory at the end. With nsplit > 1 each split stores an fp32 partial
// tile; the last CTA to finish a tile (counted with an atomic) adds the partials in split order and writes out.
// INT_PRODUCTS: folded one-row tiles add their codes as integer products (expand_run's INT).
template <typename scalar_t, int R_TILE, bool INT_PRODUCTS>
__global__ void __launch_bounds__(kThreads, expand_min_ctas(R_TILE)) expand_kernel(const ExpandArgs a) {
  constexpr int OPL = expand_opl(R_TILE), W2 = 32 * OPL, NACC = R_TILE * OPL, CP = c_pitch(R_TILE);
  constexpr bool FOLD = fold_params<scalar_t, R_TILE>(), INT = INT_PRODUCTS && FOLD;
  __shared__ __align__(16) float smem[expand_smem_floats(R_TILE)];
  __shared__ int is_last;
  allow_next_grid();

  // Locate (projection, slice) of this slot (the bank only: before waiting for stage 1); out lengths are read 8 at a
  // time so that the loads overlap.
  int slot = blockIdx.x, p = 0, olen = 0;
  bool found = false;
  for (int p0 = 0; p0 < a.P && !found; p0 += 8) {
    int len[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) len[q] = p0 + q < a.P ? __ldg(a.projs + 4 * (p0 + q) + 3) : 0;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int ns = len[q] > 0 ? (len[q] + W2 - 1) / W2 : 0;
      if (!found && p0 + q < a.P) {
        if (slot < ns) {
          found = true, p = p0 + q, olen = len[q];
        } else {
          slot -= ns;
        }
      }
    }
  }
  if (!found) return;
  const int j_start = max(0, __ldg(a.projs + 4 * p + 0)), j_end = min(a.J, __ldg(a.projs + 4 * p + 1));
  const int out_off = __ldg(a.projs + 4 * p + 2);
  const int o0 = slot * W2;  // first output of the slice, within the projection
  const int rt = blockIdx.z, r0 = rt * R_TILE;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const scalar_t* y = static_cast<const scalar_t*>(a.y);
  scalar_t* out = static_cast<scalar_t*>(a.out);
  const size_t plane = static_cast<size_t>(a.R) * a.M;
  constexpr int kRowPitch = W2 + W2 / 32;

  // Counts this CTA's arrival at its tile (its partial written before); true for the last of nsplit.
  const auto arrive = [&]() {
    __threadfence();  // the partial is visible device-wide before the count says so
    __syncthreads();
    if (threadIdx.x == 0)
      is_last = atomicAdd(a.counters + rt * gridDim.x + blockIdx.x, 1) == a.nsplit - 1;
    __syncthreads();
    if (is_last) __threadfence();
    return is_last != 0;
  };
  // The last arrival: out = y + the partials summed in split order, 8 loads in flight per output (from L2: written
  // by other CTAs).
  const auto finish = [&]() {
    for (int idx = threadIdx.x; idx < R_TILE * W2; idx += kThreads) {
      const int r = idx / W2, i = idx % W2, row = r0 + r, o = o0 + i;
      if (row >= a.R || o >= olen) continue;
      const size_t m = static_cast<size_t>(row) * a.M + out_off + o;
      const float y0 = load_f32(y + m);
      float v = 0.f;
      for (int s0 = 0; s0 < a.nsplit; s0 += 8) {
        float pv[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) pv[q] = s0 + q < a.nsplit ? __ldcg(a.part + (s0 + q) * plane + m) : 0.f;
#pragma unroll
        for (int q = 0; q < 8; ++q) v += pv[q];
      }
      store_f32(out + m, y0 + v);
    }
  };

  const int split = blockIdx.y;
  const int oi = o0 + lane * OPL;  // this lane's first output within the projection
  const bool has = oi < olen;
  const int bi = oi >> 5, q0 = oi & 31;

  float acc[NACC], cadd = 0.f;  // cadd: expand_run's folded offsets
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
  // Stage 1's sw and tpart, y, w, and this kernel's own writes come after. The fused form waits per group of rows
  // instead, and for stage 1's grid only at its end (so that this grid completes after it): it starts only once
  // every stage 1 CTA has waited for the kernels before (late trigger), and it reads no y.
  if (a.ready == nullptr) wait_prior_grids();
  const int groups = (a.J + kRowsPerCta - 1) / kRowsPerCta;

  float* cw = smem + warp * 32 * CP;  // this warp's staged c values
  // Rank rows [lo, hi) of the projection: this CTA's split of them, and of that this warp's contiguous share.
  auto walk = [&](int lo, int hi) {
    const int chunk = (hi - lo + a.nsplit - 1) / a.nsplit;
    const int js = lo + split * chunk, je = min(hi, js + chunk);
    const int per = (max(0, je - js) + kWarps - 1) / kWarps;
    const int wlo = js + warp * per, whi = min(je, wlo + per);
    for (int jb = wlo; jb < whi; jb += 32) {
      const int nb = min(32, whi - jb), j = jb + lane;
      RowDesc d{0, 0, 0, 31};
      int ub = 0;
      if (lane < nb) {  // the bank: read while the rows' groups are waited for
        const int32_t* rw = a.rows + static_cast<size_t>(j) * 8;
        ub = __ldg(rw + 3);
        d.woff = __ldg(rw + 4), d.poff = __ldg(rw + 5), d.gp = group_code(__ldg(rw + 7));
      }
      if (a.ready != nullptr) {
        for (int g = jb / kRowsPerCta; g <= (jb + nb - 1) / kRowsPerCta; ++g)
          await_count(a.ready + static_cast<size_t>(rt) * groups + g, a.ks);
      }
      if (lane < nb) {
        // c[r] = sw[r] * sum_ks tpart[ks][r], a vector of up to 4 token rows at a time (few live registers).
        constexpr int V = vec_width(R_TILE);
        const float* swp = a.sw + (static_cast<size_t>(rt) * a.J + j) * R_TILE;
        bool any = false;
#pragma unroll
        for (int r = 0; r < R_TILE; r += V) {
          float sv[V];
          load_vec<V>(swp + r, sv);
#pragma unroll
          for (int q = 0; q < V; ++q) any = any || sv[q] != 0.f;
        }
        d.bits = any && valid_bits(ub) ? ub : 0;  // inactive rows: tpart was never written, c is not used
#pragma unroll
        for (int r = 0; r < R_TILE; r += V) {
          float sv[V], tv[V];
          load_vec<V>(swp + r, sv);
#pragma unroll
          for (int q = 0; q < V; ++q) tv[q] = 0.f;
#pragma unroll 4
          for (int k = 0; k < a.ks; ++k) {
            float pv[V];
            // Read before sw is known (one dependent round trip less): an inactive row's tpart was never
            // written, and its c is zeroed below whatever it holds.
            load_vec<V>(a.tpart + ((static_cast<size_t>(k) * a.ntiles + rt) * a.J + j) * R_TILE + r, pv);
#pragma unroll
            for (int q = 0; q < V; ++q) tv[q] += pv[q];
          }
#pragma unroll
          for (int q = 0; q < V; ++q) sv[q] = d.bits != 0 ? sv[q] * tv[q] : 0.f;
          store_vec<V>(cw + lane * CP + r, sv);
        }
      }
      __syncwarp();
      const unsigned skip = __ballot_sync(kFullMask, d.bits == 0);
      int i = 0;
      while (i < nb) {
        if ((skip >> i) & 1u) {
          i += run_length(skip, i);
          continue;
        }
        const int bits = __shfl_sync(kFullMask, d.bits, i);
        const int n = run_length(__ballot_sync(kFullMask, d.bits == bits), i);
        with_width(valid_bits(bits) ? bits : 8, [&](auto B) {
          i += expand_run<decltype(B)::value, R_TILE, OPL, FOLD, INT>(acc, cadd, d, cw, i, n, a, has, bi, q0);
        });
      }
      __syncwarp();  // cw is restaged next round
    }
  };
  // With several deltas, only the rows of deltas that some token row of the tile weighs: the others' rows are never
  // visited. One delta: the projection's rows (a row whose weights are all zero is skipped by its sw).
  const int32_t* spans = a.spans + static_cast<size_t>(p) * (a.K + 1);
  for (int d0 = 0; d0 < a.K; d0 += 32) {
    const int dl = d0 + lane;
    int lo = j_start, hi = j_end;
    bool on = a.K == 1;
    if (dl < a.K && a.K > 1) {
      lo = max(j_start, __ldg(spans + dl)), hi = min(j_end, __ldg(spans + dl + 1));
#pragma unroll
      for (int r = 0; r < R_TILE; ++r)
        if (r0 + r < a.R && __ldg(a.w + static_cast<size_t>(r0 + r) * a.K + dl) != 0.f) on = true;
    }
    for (unsigned m = __ballot_sync(kFullMask, on && dl < a.K && hi > lo); m != 0u; m &= m - 1u) {
      const int l = __ffs(m) - 1;
      walk(__shfl_sync(kFullMask, lo, l), __shfl_sync(kFullMask, hi, l));
    }
  }
  if constexpr (FOLD)
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] += cadd;
  __syncthreads();  // the staging area becomes the reduction buffer

  // Sum the 8 warps' tiles: warps [h, 2h) hand theirs to warps [0, h) through shared memory (layout [w][e][lane]).
  float* red = smem;
#pragma unroll
  for (int h = kWarps / 2; h >= 1; h /= 2) {
    if (warp >= h && warp < 2 * h) {
#pragma unroll
      for (int e = 0; e < NACC; ++e) red[((warp - h) * NACC + e) * 32 + lane] = acc[e];
    }
    __syncthreads();
    if (warp < h) {
#pragma unroll
      for (int e = 0; e < NACC; ++e) acc[e] += red[(warp * NACC + e) * 32 + lane];
    }
    __syncthreads();
  }

  // Warp 0 holds the totals; stage them as [r][i + i / 32] (the padding keeps lanes on distinct banks) and write the
  // tile with consecutive threads on consecutive outputs.
  float* tile = smem;
  if (warp == 0) {
#pragma unroll
    for (int r = 0; r < R_TILE; ++r)
#pragma unroll
      for (int e = 0; e < OPL; ++e) {
        const int i = lane * OPL + e;
        tile[r * kRowPitch + i + (i >> 5)] = acc[r * OPL + e];
      }
  }
  __syncthreads();
  if (a.nsplit == 1 && !a.planes_only) {
    for (int idx = threadIdx.x; idx < R_TILE * W2; idx += kThreads) {
      const int r = idx / W2, i = idx % W2, row = r0 + r, o = o0 + i;
      if (row >= a.R || o >= olen) continue;
      const size_t m = static_cast<size_t>(row) * a.M + out_off + o;
      store_f32(out + m, load_f32(y + m) + tile[r * kRowPitch + i + (i >> 5)]);
    }
    return;
  }
  for (int idx = threadIdx.x; idx < R_TILE * W2; idx += kThreads) {
    const int r = idx / W2, i = idx % W2, row = r0 + r, o = o0 + i;
    if (row >= a.R || o >= olen) continue;
    a.part[split * plane + static_cast<size_t>(row) * a.M + out_off + o] = tile[r * kRowPitch + i + (i >> 5)];
  }
  if (!a.planes_only && arrive()) finish();
  if (a.ready != nullptr) wait_prior_grids();
}

// ------------------------------------------------------------------------------------------------------------------
// The fused form's base product
// ------------------------------------------------------------------------------------------------------------------

constexpr int kBaseRowsPerWarp = 2;                      // base kernel: outputs per warp (1 measured no faster)
constexpr int kBaseOutputs = kBaseRowsPerWarp * kWarps;  // base kernel: outputs per CTA
// The base kernel splits the inputs in two slices of a multiple of kBaseChunk elements (a whole number of 16-byte
// lane steps for every dtype) once there are more than kBaseChunk; each slice stores a plane of its own. Measured on
// an H200 at Llama-2-7B shapes, 1 row, bf16, the kernel alone with 8 loads in flight: 2 slices take q|k|v from 29.1
// to 27.1 us, o 10.9 to 9.8, gate|up 45.6 to 44.9, down 28.1 to 24.3 (cuBLAS 27.6, 12.5, 46.0, 27.0); 3 or 4 slices
// gained at most 0.6 us more.
constexpr int kBaseSplits = 2;
constexpr int kBaseChunk = 256;

struct BaseKernelArgs {
  const void* x;                      // (R, n) scalar_t
  int R, n, M, kchunk;                // kchunk: the inputs of one slice (grid.z)
  const void* weight[kMaxBaseProjs];  // projection p's base weight: outputs [end[p - 1], end[p]) (end[-1] = 0)
  int end[kMaxBaseProjs];
  int P, vec;                         // vec: x and every weight row 16-byte aligned
  float* plane;                       // (gridDim.z, R, M) fp32: the product, one plane per input slice
};

// Row o of the concatenated base weights (a select over the projections: no dynamic indexing of the parameters).
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* base_row(const BaseKernelArgs& a, int o) {
  const void* w = a.weight[0];
  int lo = 0;
#pragma unroll
  for (int q = 1; q < kMaxBaseProjs; ++q)
    if (q < a.P && o >= a.end[q - 1]) w = a.weight[q], lo = a.end[q - 1];
  return static_cast<const scalar_t*>(w) + static_cast<size_t>(o - lo) * a.n;
}

// grid (ceil(M / (NO * kWarps)), ntiles, slices), block kThreads: warp w computes outputs o = (blockIdx.x * kWarps +
// w) * NO + [0, NO) for token rows blockIdx.y * R_TILE + [0, R_TILE) over the inputs of slice blockIdx.z into that
// slice's plane (lane r: row r). It reads x without waiting: it is launched only once x is complete (behind stage 1's
// late trigger, or without early start). Only the last CTA waits for the kernel ahead of it, so that this grid
// completes after it (the next kernel waits for this grid only) while no other CTA holds its slot waiting.
template <typename scalar_t, int R_TILE, int NO>
__global__ void __launch_bounds__(kThreads) base_kernel(const BaseKernelArgs a) {
  allow_next_grid();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r0 = blockIdx.y * R_TILE, o = (blockIdx.x * kWarps + warp) * NO, nw = min(NO, a.M - o);
  float acc[NO][R_TILE];
  if (nw > 0) {
    const scalar_t* w[NO];
#pragma unroll
    for (int i = 0; i < NO; ++i) w[i] = base_row<scalar_t>(a, i < nw ? o + i : o);
    const int k_lo = blockIdx.z * a.kchunk;
    const scalar_t* x = static_cast<const scalar_t*>(a.x) + static_cast<size_t>(r0) * a.n;
    const int n = a.n;
    dot_rows<scalar_t, NO, R_TILE, kBaseLoads>(
        acc, w, nw, min(R_TILE, a.R - r0), k_lo, min(n, k_lo + a.kchunk), a.vec != 0, lane,
        [&](int r, int k, float (&xv)[16 / sizeof(scalar_t)]) {
          unpack16<scalar_t>(__ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(r) * n + k)), xv);
        },
        [&](int r, int k) { return load_f32(x + static_cast<size_t>(r) * n + k); });
  }
  if (blockIdx.x == gridDim.x - 1 && blockIdx.y == gridDim.y - 1 && blockIdx.z == gridDim.z - 1) wait_prior_grids();
  const int row = r0 + lane;
  if (nw <= 0 || lane >= R_TILE || row >= a.R) return;
#pragma unroll
  for (int r = 0; r < R_TILE; ++r) {
    if (r == lane) {
      float* dst = a.plane + (static_cast<size_t>(blockIdx.z) * a.R + row) * a.M + o;
#pragma unroll
      for (int i = 0; i < NO; ++i)
        if (i < nw) dst[i] = acc[i][r];
    }
  }
}

struct FinishArgs {
  const void* y;      // (M,) bias or null
  void* out;          // (R, M) scalar_t
  const float* base;  // (nbase, R, M) fp32, the base kernel's planes
  const float* part;  // (nplanes, R, M) fp32, stage 2's partial planes
  int nbase, nplanes, R, M;
  int* ready;         // stage 1's group counts (nready), zeroed here for the next call
  int nready;
};

// grid-stride over the R x M outputs: out = y + (the base planes, then stage 2's planes, in order), after waiting for
// the base kernel (whose last CTA waited for stage 2, which waited for stage 1).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) finish_kernel(const FinishArgs a) {
  allow_next_grid();
  wait_prior_grids();
  for (int i = blockIdx.x * kThreads + threadIdx.x; i < a.nready; i += gridDim.x * kThreads) a.ready[i] = 0;
  const size_t total = static_cast<size_t>(a.R) * a.M;
  for (size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * kThreads) {
    float v = __ldcg(a.base + i);
    for (int s = 1; s < a.nbase; ++s) v += __ldcg(a.base + s * total + i);
    for (int s = 0; s < a.nplanes; ++s) v += __ldcg(a.part + s * total + i);
    const float y0 = a.y != nullptr ? load_f32(static_cast<const scalar_t*>(a.y) + i % a.M) : 0.f;
    store_f32(static_cast<scalar_t*>(a.out) + i, y0 + v);
  }
}

struct Bank {  // the bank tensors of layout 2 (device pointers) and their sizes
  const int32_t* v_words;
  const __half *v_scale, *v_offset;
  const int32_t* u_words;
  const __half *u_scale, *u_offset;
  const float* s;
  const int32_t *rows, *projs, *spans;
  int J, P, u_nwords, u_nparams;
};

Bank make_bank(const int32_t* v_words, const void* v_scale, const void* v_offset, const int32_t* u_words,
               const void* u_scale, const void* u_offset, int64_t u_nwords, int64_t u_nparams, const float* s,
               const int32_t* rows, int64_t J, const int32_t* projs, const int32_t* spans, int64_t P) {
  return Bank{v_words,
              static_cast<const __half*>(v_scale),
              static_cast<const __half*>(v_offset),
              u_words,
              static_cast<const __half*>(u_scale),
              static_cast<const __half*>(u_offset),
              s,
              rows,
              projs,
              spans,
              static_cast<int>(J),
              static_cast<int>(P),
              static_cast<int>(u_nwords),
              static_cast<int>(u_nparams)};
}

// ------------------------------------------------------------------------------------------------------------------
// The fused form at one token row: one kernel
// ------------------------------------------------------------------------------------------------------------------
//
// A decode step's call (R == 1) runs as a single kernel, `row_kernel`, with no intermediate grid (row_path). Its grid
// is one wave; a CTA owns consecutive slices of W = 8 * NO = 16 outputs of one projection (a slice lies inside one
// 32-code block of the projection's U rows) and:
//   1. before griddepcontrol.wait (the bank and the base weights only, which are immutable): asks L2 for the first
//      kRowPrefetch bytes of each of its first slice's base weight rows and, with one delta, for its share of stage
//      1's V rows (a row a thread over the grid) and, without columns, of U;
//   2. stages x in shared memory as float, in 32-float blocks padded to 36 (conflict-free float4 reads for both uses);
//   3. takes rank rows of stage 1 from a ticket (ready[0], kWarps at a time: one per warp; with several deltas up to
//      kRowClaim a warp, as many as let the grid claim the rows of the deltas in use at once) until none are left,
//      asking for the next claim while it computes one, and for each writes c[j] = s[j] * w[delta(j)] * sum_k x[k]
//      V[j, k] (0 for a row whose delta has weight 0, whose V is not read) and counts them done in ready[1] after a
//      fence;
//   then, slice by slice:
//   4. computes the slice's base outputs, NO weight rows per warp over the whole input (kRowLoads 16-byte loads in
//      flight per lane), and asks L2 for the first bytes of the next slice's weight rows;
//   5. waits (at its first slice) until ready[1] == J, adds c[j] * U[j, slice] over the rank rows of the deltas in use
//      (a thread per rank row, kRowBatch at a time; the warps' sums meet in shared memory) and writes
//      out = bias + base + delta, rounded once (the CTAs run in step: DRAM idles through their tails, hence
//      row_path's bound on slices and rank rows);
//   6. has counted itself in ready[2] after its last use of the counters (a reduction, then a load of the count read
//      at its exit); a CTA whose load shows every CTA counted zeroes ready[0..2] for the next call, with no fence
//      before (step 6 below says why).
// With U by block column (ColumnU: a set of columns per segment, delta d's rows of a projection, of one parameter
// group), steps 4 and 5 differ: the CTA requests its columns of its projection's first segments into shared memory
// (coalesced 16-byte cp.async; with one delta before griddepcontrol.wait, with several once the weights can be read,
// two segments at once), computes every slice's base product, and after the count, segment by segment
// over the deltas in use, reads the records stage 1 wrote for the segment's rows 2 tid, 2 tid + 1, 2 tid + 512, ...
// (coalesced) and adds their integer products into every slice from shared memory while the next segment's columns
// land.
// Rank rows are claimed at run time rather than by CTA index: a CTA waits only after every row has been claimed, and
// rows are claimed by running CTAs that complete them before waiting for anything, so the wait ends whatever the
// residency (grids of several calls on several streams included). Counters are touched only after
// griddepcontrol.wait, when the grid of the call before on the stream (which zeroed them) has completed.

constexpr int kRowPad = 36;                 // floats per staged 32-element block of x
constexpr int kRowNo = 2;                   // weight rows per warp
constexpr int kRowSlice = kRowNo * kWarps;  // outputs per slice
constexpr int kRowCtasPerSm = 2;            // resident CTAs per SM the registers allow (__launch_bounds__)
constexpr int kRowLoads = 8;                // base product: 16-byte weight loads in flight per lane
constexpr int kRowBatch = 4;                // expansion: rank rows a thread loads at once
constexpr int kRowPrefetch = 2048;          // base product: bytes of each weight row asked of L2 before the wait
constexpr int kRowMaxN = 20480;             // longest input it stages (90 KB: any sm_80+ GPU); longer: the tiled path
constexpr int kRowCounters = 4;             // ready[0] ticket, [1] rows done, [2] CTAs done (int32, padded)
constexpr int kRowMaxSlices = 3;            // slices per CTA (row_path's bound)
constexpr int kColMaxSlices = 6;            // slices per CTA with U by columns (row_path's bound)
constexpr int kColRows = 8;                 // U by columns: rank rows a thread takes (segments of <= 2048)
constexpr int kRowClaim = 8;                // stage 1 with several deltas: most rank rows a warp claims at once
// U by columns: the most shared memory a CTA gives them (48 KB: shared memory is carved out of L1, through which the
// base product's weight loads pass; 88 KB of it a CTA slowed the base product by a third on an H200), and what the
// static shared memory and the driver's reserve take a CTA (bytes).
constexpr int64_t kColMaxWords = 12288;
constexpr int64_t kRowStaticSmem = 5120;
// row_kernel's static shared memory (red, base, ticket, col_plan) and the driver's 1 KB reserve fit that bound.
static_assert((kColMaxSlices * kWarps * kRowSlice + kColMaxSlices * kRowSlice + 3) * 4 + 1024 <= kRowStaticSmem);

__host__ __device__ constexpr int row_x_floats(int n) { return (n + 31) / 32 * kRowPad; }

struct RowArgs {
  const void* x;                          // (1, n) scalar_t
  int n, K, vec;                          // vec: x and every weight row 16-byte aligned
  const void* weight[kMaxBaseProjs];      // projection p's base weight (outputs [end[p - 1], end[p]))
  int end[kMaxBaseProjs];
  int cta_end[kMaxBaseProjs];             // CTAs [cta_end[p - 1], cta_end[p]) share projection p's slices
  const void* bias;                       // (M,) or null
  void* out;                              // (1, M)
  const float* w;                         // (1, K) gate weights
  Bank b;                                 // b.P projections
  float* c;                               // (J,) workspace: stage 1's c values
  int4* rec;                              // (J,) with U by block column: stage 1's record of each row for the tail
  int* ready;                             // kRowCounters, zero at the start of the call (null without rank rows)
  ColumnU cu;                              // U by block column (optional)
  int col_cap;                             // shared-memory words for the columns (0: no column path)
};

// Stage 1 for one rank row of width BITS, one warp: sum_k x[k] V[j, k] (lane l takes blocks l, l + 32, ...; 4 blocks'
// words in flight), summed over the warp.
template <int BITS>
__device__ __forceinline__ float row_shrink(const int32_t* __restrict__ row, const __half* __restrict__ scale,
                                            const __half* __restrict__ offset, int poff, int gp,
                                            const float* __restrict__ xs, int nblk, int lane) {
  constexpr int NB = 4;
  float acc = 0.f;
  for (int b0 = lane; b0 < nblk; b0 += 32 * NB) {
    uint32_t v[NB][BITS], pr[NB];
#pragma unroll
    for (int u = 0; u < NB; ++u) {
      const int bi = b0 + 32 * u;
      pr[u] = 0u;
#pragma unroll
      for (int q = 0; q < BITS; ++q) v[u][q] = 0u;
      if (bi < nblk) {
        load_lane_words<BITS, 32>(row + bi * BITS, 0, v[u]);
        pr[u] = load_param_pair(scale, offset, poff + group_index(bi * 32, gp));
      }
    }
#pragma unroll
    for (int u = 0; u < NB; ++u) {
      const int bi = b0 + 32 * u;
      if (bi >= nblk) break;
      float mul, add;
      expand_param_pair<BITS>(pr[u], mul, add);
      const float* xb = xs + bi * kRowPad;
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        float xv[4];
        load_vec<4>(xb + 4 * q, xv);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc = __fmaf_rn(__fmaf_rn(unit_code<BITS>(v[u], BITS * (4 * q + e)), mul, add), xv[e], acc);
      }
    }
  }
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) acc += __shfl_xor_sync(kFullMask, acc, m);
  return acc;
}

// The words of a W-output slice (codes q0 .. q0 + W of a block, q0 a multiple of W) of a U row of width BITS, into
// raw[0 .. lane_words) (runtime width: one case per width in row_expand_batch).
template <int BITS, int W>
__device__ __forceinline__ void row_load_slice(const int32_t* __restrict__ blk, int q0, uint32_t (&raw)[8]) {
  uint32_t v[lane_words<BITS, W>()];
  load_lane_words<BITS, W>(blk, q0, v);
#pragma unroll
  for (int q = 0; q < lane_words<BITS, W>(); ++q) raw[q] = v[q];
}

template <int BITS, int W>
__device__ __forceinline__ void row_add_slice(float (&acc)[W], const uint32_t (&raw)[8], int q0, uint32_t pair,
                                              float c) {
  uint32_t v[lane_words<BITS, W>()];
#pragma unroll
  for (int q = 0; q < lane_words<BITS, W>(); ++q) v[q] = raw[q];
  align_lane_words<BITS, W>(v, q0);
  float mul, add;
  expand_param_pair<BITS>(pair, mul, add);
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = __fmaf_rn(c, __fmaf_rn(unit_code<BITS>(v, BITS * e), mul, add), acc[e]);
}

// Rank rows j = jb + i * kThreads (i < kRowBatch, j < hi) of the slice at block bi, codes q0 .. q0 + W: metadata and
// c values, then every row's words and parameters, then the sums.
template <int W>
__device__ __forceinline__ void row_expand_batch(float (&acc)[W], const RowArgs& a, int jb, int hi, int bi, int q0) {
  int bits[kRowBatch], woff[kRowBatch], poff[kRowBatch], gp[kRowBatch];
  float cv[kRowBatch];
#pragma unroll
  for (int i = 0; i < kRowBatch; ++i) {
    const int j = jb + i * kThreads;
    bits[i] = 0, woff[i] = 0, poff[i] = 0, gp[i] = 31, cv[i] = 0.f;
    if (j < hi) {
      const int32_t* rw = a.b.rows + static_cast<size_t>(j) * 8;
      bits[i] = __ldg(rw + 3), woff[i] = __ldg(rw + 4), poff[i] = __ldg(rw + 5), gp[i] = group_code(__ldg(rw + 7));
      cv[i] = __ldcg(a.c + j);  // written by other CTAs during this call: not through L1
    }
  }
  uint32_t raw[kRowBatch][8], pair[kRowBatch];
#pragma unroll
  for (int i = 0; i < kRowBatch; ++i) {
    pair[i] = 0u;
    if (cv[i] == 0.f) bits[i] = 0;  // an inactive row (or a zero sum) adds nothing: its words are not read
    const int32_t* blk = a.b.u_words + woff[i] + bi * bits[i];
    if (!with_width(bits[i], [&](auto B) { row_load_slice<decltype(B)::value, W>(blk, q0, raw[i]); })) bits[i] = 0;
    if (bits[i] != 0) pair[i] = load_param_pair(a.b.u_scale, a.b.u_offset, poff[i] + group_index(bi * 32, gp[i]));
  }
#pragma unroll
  for (int i = 0; i < kRowBatch; ++i) {
    with_width(bits[i], [&](auto B) { row_add_slice<decltype(B)::value, W>(acc, raw[i], q0, pair[i], cv[i]); });
  }
}

// Codes q0 .. q0 + W of the block at blk (in shared memory), aligned to bit 0 of v[] (align_lane_words).
template <int BITS, int W>
__device__ __forceinline__ void smem_lane_words(const uint32_t* blk, int q0, uint32_t (&v)[lane_words<BITS, W>()]) {
  const int w0 = (BITS * q0) >> 5;
#pragma unroll
  for (int q = 0; q < lane_words<BITS, W>(); ++q) v[q] = blk[w0 + q];
  align_lane_words<BITS, W>(v, q0);
}

// acc[e] += u(code q0 + e of the block at blk, in shared memory) * cm, e < W.
template <int BITS, int W>
__device__ __forceinline__ void tail_add(float (&acc)[W], const uint32_t* blk, int q0, float cm) {
  uint32_t v[lane_words<BITS, W>()];
  smem_lane_words<BITS, W>(blk, q0, v);
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = __fmaf_rn(unit_code<BITS>(v, BITS * e), cm, acc[e]);
}

// tail_pair: pair_products of two rank rows' blocks in shared memory (pa, pb), codes q0 .. q0 + 15.
template <int BITS>
__device__ __forceinline__ void tail_pair(int (&acc)[16], const uint32_t* pa, const uint32_t* pb, int q0,
                                          uint32_t pair) {
  uint32_t a[lane_words<BITS, 16>()], b[lane_words<BITS, 16>()];
  smem_lane_words<BITS, 16>(pa, q0, a);
  smem_lane_words<BITS, 16>(pb, q0, b);
  pair_products<BITS>(acc, a, b, pair);
}

// Selects (without dynamic parameter indexing) projection p's weight pointer and output range.
__device__ __forceinline__ void row_projection(const RowArgs& a, int cta, int& p, const void*& weight, int& lo) {
  p = 0, weight = a.weight[0], lo = 0;
#pragma unroll
  for (int q = 1; q < kMaxBaseProjs; ++q)
    if (q < a.b.P && cta >= a.cta_end[q - 1]) p = q, weight = a.weight[q], lo = a.end[q - 1];
}

#ifdef DELTACOMP_ROW_TRACE
// Timing build only (check_standalone --trace): thread 0 of each one-row CTA stamps %globaltimer at nine points (entry,
// past the wait, stage 1 done, base products done, the count seen, exit; with U by block column also a segment's
// records read with its columns landed, the last one's stamp kept, and the tail's sums done; its first slice's base
// product done) into g_row_trace[call][cta][0..9), then its SM's index plus one, its outputs and the stage-1 rank rows
// it computed.
constexpr int kTraceCtas = 1024, kTraceTimes = 9, kTraceStamps = kTraceTimes + 3;
__device__ unsigned long long* g_row_trace = nullptr;
__device__ int* g_row_trace_ctas = nullptr;  // per call: its grid
__device__ int g_row_trace_cap = 0, g_row_trace_call = 0, g_row_trace_done = 0;
#define ROW_STAMP(k) \
  if (threadIdx.x == 0) stamp[k] = global_ns()
#else
#define ROW_STAMP(k)
#endif

// grid (launch_row), block kThreads, dynamic shared memory row_x_floats(n) floats. See above.
template <typename scalar_t, bool MULTI>
__global__ void __launch_bounds__(kThreads, kRowCtasPerSm) row_kernel(const RowArgs a) {
  const int K = MULTI ? a.K : 1;  // deltas (a separate instantiation for one, which keeps its registers)
  constexpr int NO = kRowNo, W = kRowSlice;
  constexpr bool kIntTail = !std::is_same_v<scalar_t, float>;  // the column tail in integer products (16-bit x)
  static_assert(W == 16, "the slice's reduction below takes 16 outputs");
  extern __shared__ __align__(16) float xs[];
  __shared__ float red[kColMaxSlices][kWarps][W];  // the warps' delta sums per slice
  __shared__ float base[kColMaxSlices][W];         // the slices' base outputs
  __shared__ int ticket;
  __shared__ int col_plan[2];  // the column path with several deltas: the segments in flight (deltas' indices)
#ifdef DELTACOMP_ROW_TRACE
  unsigned long long stamp[kTraceStamps] = {};
#endif
  ROW_STAMP(0);
  allow_next_grid();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int p, out_lo;
  const void* weight;
  row_projection(a, blockIdx.x, p, weight, out_lo);
  const int first = p > 0 ? a.cta_end[p - 1] : 0;
  const int plen = a.end[p] - out_lo;  // the projection's outputs
  // This CTA's slices of the projection: an even share of its ceil(plen / W), consecutive.
  const int nslices = (plen + W - 1) / W, nctas = a.cta_end[p] - first, k = blockIdx.x - first;
  const int s_lo = k * nslices / nctas, s_hi = (k + 1) * nslices / nctas;
#ifdef DELTACOMP_ROW_TRACE
  if (threadIdx.x == 0) {
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    stamp[kTraceTimes] = sm + 1, stamp[kTraceTimes + 1] = min(s_hi * W, plen) - s_lo * W;
  }
#endif
  // The warp's NO weight rows of the slice at output o0 (within the projection), and how many of them exist.
  const scalar_t* wr[NO];
  int nw = 0;
  const auto slice_rows = [&](int o0) {
    const int ob = o0 + warp * NO;
    nw = min(NO, plen - ob);
#pragma unroll
    for (int i = 0; i < NO; ++i)
      wr[i] = static_cast<const scalar_t*>(weight) + static_cast<size_t>(ob + (i < nw ? i : 0)) * a.n;
  };
  // Asks L2 for the first kRowPrefetch bytes of each of them.
  const auto prefetch_rows = [&]() {
    const int lines = (min(a.n * static_cast<int>(sizeof(scalar_t)), kRowPrefetch) + 127) / 128;
#pragma unroll
    for (int i = 0; i < NO; ++i)
      for (int l = lane; l < lines && i < nw; l += 32)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(reinterpret_cast<const char*>(wr[i]) + l * 128));
  };

  // The base product of the slice at o0: its W outputs into dst (NO weight rows per warp over the whole input).
  const auto base_product = [&](int o0, float* dst) {
    slice_rows(o0);
    float acc[NO][1];
    if (nw > 0)
      dot_rows<scalar_t, NO, 1, kRowLoads>(
          acc, wr, nw, 1, 0, a.n, a.vec != 0, lane,
          [&](int, int k, float (&xv)[16 / sizeof(scalar_t)]) {
            load_vec<16 / sizeof(scalar_t)>(xs + (k >> 5) * kRowPad + (k & 31), xv);
          },
          [&](int, int k) { return xs[(k >> 5) * kRowPad + (k & 31)]; });
    if (lane == 0)
#pragma unroll
      for (int i = 0; i < NO; ++i) dst[warp * NO + i] = nw > i ? acc[i][0] : 0.f;
  };

  // out = bias + base + the warps' delta sums (none when dsum is null) for output e of the slice at o0.
  const auto store_output = [&](const float* bsum, const float (*dsum)[W], int o0, int e) {
    float v = bsum[e];
    if (dsum != nullptr)
#pragma unroll
      for (int q = 0; q < kWarps; ++q) v += dsum[q][e];
    const int o = out_lo + o0 + e;
    const float b0 = a.bias != nullptr ? load_f32(static_cast<const scalar_t*>(a.bias) + o) : 0.f;
    store_f32(static_cast<scalar_t*>(a.out) + o, b0 + v);
  };

  // 1. The bank and the weights (immutable): requested before the kernels ahead have finished.
  slice_rows(s_lo * W);
  prefetch_rows();
  int j_start = 0, j_end = 0, ulen = 0;
  // Asks L2 for the V words of a rank row of width vb from word woff.
  const auto ask_v_row = [&](int vb, int woff) {
    const int block_bytes = (a.n + 31) / 32 * 4;  // a V row's bytes per bit of width
    const char* row = reinterpret_cast<const char*>(a.b.v_words + woff);
    if (valid_bits(vb))
      for (int l = 0; l < block_bytes * vb; l += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + l));
  };
  if (a.b.J > 0) {
    j_start = max(0, __ldg(a.b.projs + 4 * p)), j_end = min(a.b.J, __ldg(a.b.projs + 4 * p + 1));
    ulen = __ldg(a.b.projs + 4 * p + 3);
    // With one delta (every row active unless its weight is 0): stage 1's V rows asked of L2, a row a thread over
    // the grid.
    for (int j = blockIdx.x + gridDim.x * threadIdx.x; K == 1 && j < a.b.J; j += gridDim.x * kThreads) {
      const int32_t* rw = a.b.rows + static_cast<size_t>(j) * 8;
      ask_v_row(__ldg(rw), __ldg(rw + 1));
    }
    if (K == 1 && a.col_cap == 0) {  // with U by block column the tail reads the columns instead
      prefetch_share_l2(a.b.u_words, static_cast<size_t>(a.b.u_nwords) * 4, blockIdx.x, gridDim.x);
      prefetch_share_l2(a.b.u_scale, static_cast<size_t>(a.b.u_nparams) * 2, blockIdx.x, gridDim.x);
      prefetch_share_l2(a.b.u_offset, static_cast<size_t>(a.b.u_nparams) * 2, blockIdx.x, gridDim.x);
    }
  }
  // The column path: every segment (delta d's rows of the projection) of one parameter group and at most
  // kColRows * kThreads rows, at most kColMaxSlices slices (an uneven share can give a CTA more than row_path's
  // bound), the CTA's columns fitting: with several deltas two segments' at once, in buffers of bufw words.
  uint32_t* colw = reinterpret_cast<uint32_t*>(xs + row_x_floats(a.n));
  const int o_end = min(s_hi * W, ulen), bA = (s_lo * W) >> 5;
  const int nbc = s_lo * W < o_end ? ((o_end - 1) >> 5) - bA + 1 : 0;
  // Delta d's rank rows of the projection.
  const auto segment = [&](int d, int& lo, int& hi) {
    lo = j_start, hi = j_end;
    if (K > 1) {
      const int32_t* spans = a.b.spans + static_cast<size_t>(p) * (K + 1);
      lo = max(j_start, __ldg(spans + d)), hi = min(j_end, __ldg(spans + d + 1));
    }
  };
  constexpr int nbuf = MULTI ? 2 : 1;
  const int bufw = a.col_cap / nbuf / 4 * 4;
  bool use_cols = false;
  if (a.col_cap > 0 && a.b.J > 0 && nbc > 0 && s_hi - s_lo <= kColMaxSlices) {
    int widest = 0;
    use_cols = true;
    for (int d = 0; d < K && use_cols; ++d) {
      int lo, hi;
      segment(d, lo, hi);
      const int q = p * K + d;
      widest = max(widest, __ldg(a.cu.info + 3 * q + 1));
      use_cols = __ldg(a.cu.info + 3 * q + 2) != 0 && hi - lo <= kColRows * kThreads;
    }
    use_cols = use_cols && nbc * widest <= bufw;
  }
  // Segment d's nbc columns into buffer buf (coalesced 16-byte copies bypassing L1), one cp.async group.
  const auto copy_columns = [&](int d, int buf) {
    const int q = p * K + d, cw = __ldg(a.cu.info + 3 * q + 1);
    const int4* src = reinterpret_cast<const int4*>(a.cu.cols + __ldg(a.cu.info + 3 * q) + bA * cw);
    uint32_t* dst = colw + buf * bufw;
    for (int i = threadIdx.x; i < nbc * cw / 4; i += kThreads) {
      const unsigned sd = static_cast<unsigned>(__cvta_generic_to_shared(dst + 4 * i));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sd), "l"(src + i) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  // The first delta from d on whose weight is not 0 (K when none; one delta is taken whatever its weight, since
  // its columns are requested before the weight can be read).
  const auto next_active = [&](int d) {
    if constexpr (MULTI) {
      while (d < K && __ldg(a.w + d) == 0.f) ++d;
      return d;
    } else {
      return d < 1 ? 0 : 1;
    }
  };
  if (use_cols && !MULTI) copy_columns(0, 0);  // immutable: requested before the kernels ahead have finished
  wait_prior_grids();
  ROW_STAMP(1);
  // With several deltas, the first segments' columns once the weights can be read (they land during stage 1 and
  // the base products); which ones wait in shared memory for the tail.
  if (MULTI && use_cols) {
    const int d_cur = next_active(0), d_next = d_cur < K ? next_active(d_cur + 1) : K;
    if (d_cur < K) copy_columns(d_cur, 0);
    if (d_next < K) copy_columns(d_next, 1);
    if (threadIdx.x == 0) col_plan[0] = d_cur, col_plan[1] = d_next;
  }
  // Stage 1's claims: kWarps * rpw rank rows, rpw a warp. With several deltas (whose V rows were not asked of L2
  // before the wait) enough rows a warp that the grid claims every row of the deltas in use at once (their share
  // of the rows taken as their share of the deltas), at most kRowClaim: rows of deltas not in use cost little, and
  // claims of one row let the CTAs that find none take more of the others.
  int rpw = 1;
  if constexpr (MULTI) {
    const int used = K <= 32 ? __popc(__ballot_sync(kFullMask, lane < K && __ldg(a.w + lane) != 0.f)) : K;
    const int rows = (a.b.J / K) * used + (a.b.J % K) * used / K, warps = gridDim.x * kWarps;
    rpw = min(kRowClaim, max(1, (rows + warps - 1) / warps));
  }

  // Thread 0 counts its CTA done in ready[2] after its last use of the counters: a reduction (an atomic's answer
  // would be waited for at once: ptxas aggregates it over the warp), then a load of the count, which follows the
  // reduction in the counter's order and is read only at the exit (a CTA that loads the grid's size zeroes the
  // counters; more than one may). No release: the CTA's earlier uses are reads consumed before the count (the last
  // one an acquire), and stage 1's done counts all landed before some CTA saw ready[1] complete and counted.
  int counted = 0;
  bool has_counted = false;  // kept apart from `counted`, which is read only at the exit
  const auto count_self = [&]() {
    asm volatile("red.relaxed.gpu.global.add.s32 [%0], 1;" ::"l"(a.ready + 2) : "memory");
    asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(counted) : "l"(a.ready + 2) : "memory");
    has_counted = true;
  };

  // 2. x, and the first claim of stage 1's rank rows (its answer travels with x's loads).
  if (threadIdx.x == 0 && a.b.J > 0) ticket = atomicAdd(a.ready, kWarps * rpw);
  const int nblk = (a.n + 31) / 32;
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  if (a.vec) {
    constexpr int VEC = 16 / sizeof(scalar_t);
    for (int i = threadIdx.x; i < a.n / VEC; i += kThreads) {
      float f[VEC];
      unpack16<scalar_t>(__ldg(reinterpret_cast<const uint4*>(x) + i), f);
      const int k = i * VEC;
      store_vec<VEC>(xs + (k >> 5) * kRowPad + (k & 31), f);
    }
    for (int k = a.n + threadIdx.x; k < nblk * 32; k += kThreads) xs[(k >> 5) * kRowPad + (k & 31)] = 0.f;
  } else {
    for (int k = threadIdx.x; k < nblk * 32; k += kThreads)
      xs[(k >> 5) * kRowPad + (k & 31)] = k < a.n ? load_f32(x + k) : 0.f;
  }
  __syncthreads();

  // 3. Stage 1: kWarps * rpw rank rows per claim, rows j0 + warp + kWarps * i of warp `warp`. With several deltas,
  // lane i reads row i's metadata (one round trip for the warp's rows, handed on by shuffles) and asks L2 for its V
  // words when its delta is in use, so that the warp's rows arrive together; with one delta every lane reads its row's.
  for (int j0 = a.b.J > 0 ? ticket : a.b.J; j0 < a.b.J;) {
    // The next claim is asked for now: its answer arrives while this one is computed.
    int next = 0;
    if (threadIdx.x == 0) next = atomicAdd(a.ready, kWarps * rpw);
    int mvb = 0, mwoff = 0, mpoff = 0, mgs = 0, mdsc = 0;
    uint32_t mpair = 0u;
    float msj = 0.f, mwt = 0.f;
    const int jm = j0 + warp + (MULTI ? kWarps * lane : 0);
    if ((!MULTI || lane < rpw) && jm < a.b.J) {
      const int32_t* rw = a.b.rows + static_cast<size_t>(jm) * 8;
      const int delta = __ldg(rw + 6);
      mvb = __ldg(rw), mwoff = __ldg(rw + 1), mpoff = __ldg(rw + 2), mgs = __ldg(rw + 7), msj = __ldg(a.b.s + jm);
      mwt = delta >= 0 && delta < K ? __ldg(a.w + delta) : 0.f;
      if (a.col_cap > 0) mdsc = __ldg(a.cu.desc + jm), mpair = __ldg(a.cu.pair + jm);
      if (MULTI && rpw > 1 && mwt != 0.f) ask_v_row(mvb, mwoff);
    }
    for (int i = 0; i < rpw; ++i) {
      const int j = j0 + warp + kWarps * i;
      if (j >= a.b.J) break;
      const auto pick = [&](auto v) { return MULTI ? __shfl_sync(kFullMask, v, i) : v; };
      const int vb = pick(mvb), woff = pick(mwoff), poff = pick(mpoff), gp = group_code(pick(mgs));
      const float sj = pick(msj), wt = pick(mwt);
      float t = 0.f;
      if (wt != 0.f) {
        const int32_t* row = a.b.v_words + woff;
        with_width(vb, [&](auto B) {  // not a valid width: the row adds nothing
          t = row_shrink<decltype(B)::value>(row, a.b.v_scale, a.b.v_offset, poff, gp, xs, nblk, lane);
        });
      }
      const float c = wt != 0.f && valid_bits(vb) ? t * sj * wt : 0.f;
      const int dsc = pick(mdsc);
      const uint32_t pr = pick(mpair);
      if (lane == 0) {
        a.c[j] = c;
        // The column tail's record of the row: c times U's scale and offset, and U's descriptor (zeros for a row that
        // adds nothing), so that the tail reads one 16-byte word a row, written during this call.
        if (a.col_cap > 0) {
          const bool live = c != 0.f && valid_bits(dsc & 15);
          const int4 r = live ? make_int4(__float_as_int(c * pair_scale(pr)), __float_as_int(c * pair_offset(pr)),
                                          dsc, 0)
                              : make_int4(0, 0, 0, 0);
          store_evict_last(a.rec + j, r);
        }
      }
    }
    fence_acq_rel();  // c is visible device-wide before the count says so (await_count acquires it)
    __syncthreads();
    if (threadIdx.x == 0) {
      const int done = min(kWarps * rpw, a.b.J - j0);
      atomicAdd(a.ready + 1, done);
      ticket = next;
#ifdef DELTACOMP_ROW_TRACE
      stamp[kTraceTimes + 2] += done;
#endif
    }
    __syncthreads();
    j0 = ticket;
    __syncthreads();  // every thread has read the ticket before the next claim overwrites it
  }
  ROW_STAMP(2);

  if (use_cols) {
    // 4'. The base products of every slice (sums in shared memory), with the columns landing meanwhile.
    const int nsl = s_hi - s_lo;
    for (int s = 0; s < nsl; ++s) {
      base_product((s_lo + s) * W, base[s]);
      if (s == 0) ROW_STAMP(8);
      if (s + 1 < nsl) {
        slice_rows((s_lo + s + 1) * W);
        prefetch_rows();
      }
    }
    // 5'. Once every c is written, segment by segment (the deltas in use, in order; with two buffers the next
    // segment's columns land while this one is decoded): each thread's pairs of neighbouring rows (consecutive
    // pairs in consecutive lanes: coalesced reads, mostly one width per warp), their records from stage 1 in
    // registers, their codes' products with int16 multipliers summed exactly in int32 for every slice from shared
    // memory, then scaled; the warps' sums add up in red.
    ROW_STAMP(3);
    if (threadIdx.x == 0) await_count(a.ready + 1, a.b.J);
#pragma unroll
    for (int s = 0; s < kColMaxSlices; ++s)
      if (s < nsl && (lane & 1) == 0) red[s][warp][lane >> 1] = 0.f;
    // One delta: its columns were requested before the wait and have landed during the base products; the barrier
    // below makes every thread's copies visible, so the segment needs no barrier of its own.
    if constexpr (!MULTI) asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    ROW_STAMP(4);
    int d_cur = MULTI ? col_plan[0] : 0, d_next = MULTI ? col_plan[1] : 1;
    for (int buf = 0; d_cur < K;) {
      int lo, hi;
      segment(d_cur, lo, hi);
      const int cw = __ldg(a.cu.info + 3 * (p * K + d_cur) + 1);
      // The thread's rank rows lo + 2 * threadIdx.x + (i & 1) + (i >> 1) * 2 * kThreads, in pairs of neighbours (of
      // one width but where a width's rows end): their multipliers as int16 against the largest of them.
      int dsc[kColRows];
      float cm[kColRows], ca = 0.f, big = 0.f;
#pragma unroll
      for (int i = 0; i < kColRows; ++i) {
        const int j = lo + 2 * static_cast<int>(threadIdx.x) + (i & 1) + (i >> 1) * 2 * kThreads;
        dsc[i] = 0, cm[i] = 0.f;
        if (j < hi) {
          const int4 r = __ldcg(a.rec + j);  // written by other CTAs during this call: not through L1
          dsc[i] = r.z, cm[i] = __int_as_float(r.x), ca += __int_as_float(r.y);
          if constexpr (kIntTail) {
            big = fmaxf(big, fabsf(cm[i]));
          } else {  // decoded as u = 1 + code / 2^BITS
            cm[i] *= static_cast<float>(1 << (r.z & 15));
            ca -= cm[i];
          }
        }
      }
      // Thread 0's count, after the barrier that every warp waits at (its records' loads are in flight).
      if (threadIdx.x == 0 && !has_counted) count_self();
      const float inv = big > 0.f ? 32767.f / big : 0.f, unit = big * (1.f / 32767.f);
      uint32_t pairs[kColRows / 2];
#pragma unroll
      for (int i = 0; i < kColRows / 2; ++i) pairs[i] = int16_pair(cm[2 * i], cm[2 * i + 1], inv);
      if constexpr (MULTI) {
        if (d_next < K)
          asm volatile("cp.async.wait_group 1;" ::: "memory");
        else
          asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();
      }
      ROW_STAMP(6);
      for (int s = 0; s < nsl; ++s) {
        const int o0 = (s_lo + s) * W, q0 = o0 & 31;
        const uint32_t* col = colw + buf * bufw + ((o0 >> 5) - bA) * cw;  // read only if o0 < o_end
        float acc[W];
        if constexpr (kIntTail) {
          int iacc[W];
#pragma unroll
          for (int e = 0; e < W; ++e) iacc[e] = 0;
          if (o0 < o_end) {
#pragma unroll
            for (int i = 0; i < kColRows / 2; ++i) {
              // A pair of two widths (or with one row absent, width 0) goes as two pairs of a row with itself.
              const int da = dsc[2 * i], db = dsc[2 * i + 1], passes = (da & 15) == (db & 15) ? 1 : 2;
              for (int t = 0; t < passes; ++t) {
                const int d0 = t == 0 ? da : db, d1 = passes == 1 ? db : d0;
                const uint32_t m = passes == 1 ? pairs[i] : pairs[i] & (t == 0 ? 0xffffu : 0xffff0000u);
                const uint32_t *p0 = col + (d0 >> 4), *p1 = col + (d1 >> 4);
                with_width(d0 & 15, [&](auto B) { tail_pair<decltype(B)::value>(iacc, p0, p1, q0, m); });
              }
            }
          }
#pragma unroll
          for (int e = 0; e < W; ++e) acc[e] = __fmaf_rn(static_cast<float>(iacc[e]), unit, ca);
        } else {  // fp32 activations keep fp32 multipliers
#pragma unroll
          for (int e = 0; e < W; ++e) acc[e] = ca;
          if (o0 < o_end) {
#pragma unroll
            for (int i = 0; i < kColRows; ++i) {
              const uint32_t* blk = col + (dsc[i] >> 4);
              with_width(dsc[i] & 15, [&](auto B) { tail_add<decltype(B)::value, W>(acc, blk, q0, cm[i]); });
            }
          }
        }
        warp_reduce_scatter<W, 16>(acc, lane);  // lanes 2i and 2i + 1 hold output i
        if ((lane & 1) == 0) red[s][warp][lane >> 1] += acc[0];
      }
      // The segment after those in flight goes into the buffer just read, once every thread is done with it.
      const int d_after = next_active((nbuf == 2 ? d_next : d_cur) + 1);
      if (d_after < K) {
        __syncthreads();
        copy_columns(d_after, buf);
      }
      if (nbuf == 2) {
        d_cur = d_next, d_next = d_after, buf ^= 1;
      } else {
        d_cur = d_after;
      }
    }
    __syncthreads();
    ROW_STAMP(7);
    for (int i = threadIdx.x; i < nsl * W; i += kThreads) {
      const int s = i / W, e = i % W, o0 = (s_lo + s) * W;
      if (o0 + e < plen) store_output(base[s], o0 < o_end ? red[s] : nullptr, o0, e);
    }
  } else {
    for (int sl = s_lo; sl < s_hi; ++sl) {
      const int o0 = sl * W;
      base_product(o0, base[0]);  // 4. The base product of the slice.
      if (sl == s_lo) ROW_STAMP(8);

      // 5. The delta on the slice, once every c is written (DRAM meanwhile busy with the next slice's first bytes).
      if (sl + 1 < s_hi) {
        slice_rows(o0 + W);
        prefetch_rows();
      }
      float acc[W];
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] = 0.f;
      if (a.b.J > 0) {
        if (sl == s_lo) {
          ROW_STAMP(3);
          if (threadIdx.x == 0) {
            await_count(a.ready + 1, a.b.J);
            count_self();
          }
          __syncthreads();
          ROW_STAMP(4);
        }
        if (o0 < ulen) {
          const int bi = o0 >> 5, q0 = o0 & 31;
          for (int d = next_active(0); d < K; d = next_active(d + 1)) {  // the rank rows of each delta in use
            int lo, hi;
            segment(d, lo, hi);
            for (int jb = lo + threadIdx.x; jb < hi; jb += kThreads * kRowBatch)
              row_expand_batch<W>(acc, a, jb, hi, bi, q0);
          }
        }
      }
      warp_reduce_scatter<W, 16>(acc, lane);  // lanes 2i and 2i + 1 hold output i
      if ((lane & 1) == 0) red[0][warp][lane >> 1] = acc[0];
      __syncthreads();
      if (threadIdx.x < W && o0 + static_cast<int>(threadIdx.x) < plen) store_output(base[0], red[0], o0, threadIdx.x);
      __syncthreads();  // base and red are free for the next slice
    }
  }

#ifdef DELTACOMP_ROW_TRACE
  ROW_STAMP(5);
  if (threadIdx.x == 0) {
    const int call = *reinterpret_cast<volatile int*>(&g_row_trace_call);
    if (call < g_row_trace_cap && blockIdx.x < kTraceCtas) {
      for (int k = 0; k < kTraceStamps; ++k)
        g_row_trace[(static_cast<size_t>(call) * kTraceCtas + blockIdx.x) * kTraceStamps + k] = stamp[k];
      if (blockIdx.x == 0) g_row_trace_ctas[call] = gridDim.x;
    }
    __threadfence();
    if (atomicAdd(&g_row_trace_done, 1) == static_cast<int>(gridDim.x) - 1) {
      g_row_trace_done = 0;
      atomicAdd(&g_row_trace_call, 1);
    }
  }
#endif
  // 6. A CTA whose load of the count shows the grid's size zeroes the counters: each CTA has counted itself after
  // its last use of them (a CTA that never waited counts now). Those uses are reads whose values were consumed
  // before the count was issued, and the zeroing CTA issues its stores only once its load has returned, so no fence
  // is needed before them (one cost about 0.3 us a call); several CTAs may store the same zeros; the next call reads
  // the counters only after this grid has completed.
  if (a.ready != nullptr && threadIdx.x == 0) {
    if (!has_counted) count_self();
    if (counted == static_cast<int>(gridDim.x)) {
      a.ready[0] = 0, a.ready[1] = 0, a.ready[2] = 0;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Host planning and launch
// ------------------------------------------------------------------------------------------------------------------

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

struct Plan {
  int r_tile = 1, ntiles = 0;
  // stage 1 (target1: the CTAs that fill the GPU once)
  int groups = 0, ks = 1, kb_cta = 0, ktb = 0, target1 = 0;
  size_t shrink_smem = 0;
  // stage 2
  int slots = 0, nsplit = 1;
  // fused only: the base kernel's CTAs per row tile and input slice, its input slices and their length
  int base_blocks = 0, base_ks = 1, base_kchunk = 0;
  // workspace, in floats (the counters are int32 in the same buffer)
  size_t sw_off = 0, tpart_off = 0, part_off = 0, base_off = 0, counter_off = 0, total = 0;
  int ncounters = 0;
};

// Stage 1's CTAs per (K slice, row tile): one per group of 32 rank rows, except for a multi-tenant plan (row tiles of
// one row over 2 to 32 deltas), where a row tile takes its deltas' groups only (active_group): most rows weigh one
// delta, and a CTA per group of every delta mostly finds nothing to read (on the H200, 16 deltas at Llama-2-7B's
// q|k|v, 16 rows: 24,048 CTAs, 15 in 16 idle, 177 us; as many CTAs as one delta has groups, 1,504, 101 us). Its CTAs
// are then as many as fill the GPU once, between a quarter of one delta's groups and all of them: each walks a few
// groups of its row on one x tile, staged once.
int shrink_ctas(const Plan& p, int64_t K) {
  if (p.r_tile != 1 || p.ntiles < 2 || K < 2 || K > 32) return p.groups;
  const int64_t one = ceil_div<int64_t>(p.groups, K);
  const int64_t fill = ceil_div<int64_t>(p.target1, static_cast<int64_t>(p.ntiles) * p.ks);
  return static_cast<int>(std::min<int64_t>(one, std::max<int64_t>(ceil_div<int64_t>(one, 4), fill)));
}

// The fused form's CTAs per SM for each of the delta's stages, beside the base kernel. Measured on an H200 at
// Llama-2-7B shapes, 1 row (benchmarks/kernel_speed.py, 1, 2 or 3 for each stage): with 1 the delta's chains of
// dependent loads are long and, slowed by the base product's traffic, outlast it (a 7B decode step 1.64x the base);
// 2 and 2 gave 1.51x, 3 and 3 1.60x (their CTAs, waiting for stage 1, take the base product's slots).
constexpr int kFusedDeltaCtas = 2;

// row_tile: the largest row tile the caller allows (0: no limit; otherwise rounded down to 1, 2, 4, 8 or 16).
// fused: the base kernel computes the base product too (delta_linear_base_launch).
Plan make_plan(int64_t R, int64_t n, int64_t M, int64_t J, int64_t P, int num_sms, int64_t row_tile,
               bool fused = false) {
  Plan p;
  p.r_tile = R <= 1 ? 1 : R <= 2 ? 2 : R <= 4 ? 4 : R <= 8 ? 8 : 16;
  while (row_tile > 0 && p.r_tile > row_tile) p.r_tile /= 2;
  p.ntiles = static_cast<int>(ceil_div<int64_t>(R, p.r_tile));
  const int64_t sms = num_sms > 0 ? num_sms : 1;

  // Stage 1: K is split over CTAs until they fill the GPU once (shrink_min_ctas per SM), keeping whole warp passes
  // per CTA.
  // Fused: kFusedDeltaCtas per SM, so that the base kernel finds room beside it from the start.
  const int64_t target1 = sms * (fused ? kFusedDeltaCtas : shrink_min_ctas(p.r_tile));
  p.target1 = static_cast<int>(target1);
  const int64_t nblk = ceil_div<int64_t>(n, 32);
  const int pass = shrink_opl(p.r_tile);  // blocks per warp pass (32 lanes x OPL codes)
  const int ktb_max = (kShrinkSmemFloats / block_floats(p.r_tile)) / pass * pass;
  p.groups = static_cast<int>(ceil_div<int64_t>(J, kRowsPerCta));
  if (nblk > 0) {
    const int64_t base = static_cast<int64_t>(p.groups) * p.ntiles;
    int64_t ks = base > 0 ? ceil_div<int64_t>(target1, base) : 1;
    ks = ks < 1 ? 1 : ks;
    int64_t ks_max = nblk / pass > 1 ? nblk / pass : 1;
    ks_max = ks_max < 65535 ? ks_max : 65535;  // grid.y
    ks = ks > ks_max ? ks_max : ks;
    const int64_t kb_cta = ceil_div<int64_t>(ceil_div<int64_t>(nblk, ks), pass) * pass;
    p.kb_cta = static_cast<int>(kb_cta);
    p.ks = static_cast<int>(ceil_div<int64_t>(nblk, kb_cta));
    p.ktb = p.kb_cta < ktb_max ? p.kb_cta : ktb_max;
  }
  p.shrink_smem = static_cast<size_t>(p.ktb) * block_floats(p.r_tile) * sizeof(float);

  // Stage 2: split each projection's rank rows over CTAs while the output tiles alone do not fill the GPU once.
  // Without rank rows there is no stage 1 to zero the split counters: no split then.
  const int64_t target2 = sms * expand_min_ctas(p.r_tile);
  const int w2 = 32 * expand_opl(p.r_tile);
  const int64_t tiles = ceil_div<int64_t>(M, w2);
  p.slots = static_cast<int>(tiles + P);  // >= sum over projections of ceil(out_len / w2)
  const int64_t per = tiles * p.ntiles;   // output tiles over the row tiles: CTAs per split
  int64_t nsplit = per > 0 ? ceil_div<int64_t>(target2, per) : 1;
  const int64_t rows_per_proj = P > 0 ? ceil_div<int64_t>(J, P) : 0;
  int64_t cap = rows_per_proj / 32;  // keep at least ~32 rank rows per CTA
  cap = cap < 1 ? 1 : (cap > kMaxSplits ? kMaxSplits : cap);
  if (fused) {
    // Stage 2 waits for stage 1 beside the base kernel, with kFusedDeltaCtas per SM, so that the base product has
    // room from the start; its splits only store planes (no counters).
    nsplit = per > 0 ? kFusedDeltaCtas * sms / per : 1;
    p.base_blocks = static_cast<int>(ceil_div<int64_t>(M, kBaseOutputs));
    const int64_t chunk = ceil_div<int64_t>(ceil_div<int64_t>(n, kBaseSplits), kBaseChunk) * kBaseChunk;
    p.base_kchunk = static_cast<int>(n > kBaseChunk ? chunk : n);
    p.base_ks = p.base_kchunk > 0 ? static_cast<int>(ceil_div<int64_t>(n, p.base_kchunk)) : 1;
  } else if (per > 0) {
    // By waves: a CTA's time goes as 1 / nsplit and the grid takes ceil(CTAs / target2) rounds of it, so fewer
    // splits than the above where that takes fewer rounds per split (gate|up at one row on 132 SMs: 9 splits, 387
    // CTAs in one round, rather than 10, 430 and a second round of 34).
    const auto rounds = [&](int64_t s) { return ceil_div<int64_t>(per * s, target2); };
    int64_t best = nsplit < cap ? nsplit : cap;
    for (int64_t s = best - 1; s >= 1; --s)
      if (rounds(s) * best < rounds(best) * s) best = s;
    nsplit = best;
  }
  nsplit = nsplit < 1 ? 1 : (nsplit > cap ? cap : nsplit);
  p.nsplit = J > 0 ? static_cast<int>(nsplit) : 1;

  // Workspace: sw, tpart, partials, the base plane (fused), counters; each region starts on a 16-byte boundary.
  const auto round4 = [](size_t v) { return (v + 3) / 4 * 4; };
  const size_t per_tile = static_cast<size_t>(p.ntiles) * static_cast<size_t>(J) * p.r_tile;
  const bool planes = p.nsplit > 1 || fused;
  p.ncounters = p.nsplit > 1 && !fused ? p.slots * p.ntiles : 0;
  p.sw_off = 0;
  p.tpart_off = round4(per_tile);
  p.part_off = p.tpart_off + round4(per_tile * p.ks);
  p.base_off = p.part_off + round4(planes ? static_cast<size_t>(p.nsplit) * R * M : 0);
  p.counter_off = p.base_off + round4(fused ? static_cast<size_t>(p.base_ks) * R * M : 0);
  p.total = p.counter_off + round4(static_cast<size_t>(p.ncounters));
  return p;
}

// Opts KERNEL into `bytes` of dynamic shared memory on the current device, once per device and instantiation (the
// largest so far): a launch whose static and dynamic shared memory together pass 48 KB fails without it.
template <auto KERNEL>
cudaError_t allow_dynamic_smem(size_t bytes) {
  static std::atomic<int> allowed[64];
  const int smem = static_cast<int>(bytes);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess || (device < 64 && allowed[device].load() >= smem)) return err;
  err = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess && device < 64) allowed[device].store(smem);
  return err;
}

// Launches `kernel` on `stream`; with `pdl`, allowed to start before the kernel ahead of it finishes (sm_90).
template <typename Args>
cudaError_t launch_kernel(void (*kernel)(Args), dim3 grid, size_t smem, bool pdl, cudaStream_t stream,
                          const Args& args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, args);
}


// The fused base product's inputs (base[0] null: none) and stage 1's group counts.
struct BaseArgs {
  const void* base[kMaxBaseProjs];
  int base_rows[kMaxBaseProjs];
  int base_vec;
  int* ready;
};

template <typename scalar_t, int R_TILE>
cudaError_t launch_tiled(const Plan& p, const void* x, const void* y, void* out, int R, int n, int M, const float* w,
                         int K, const Bank& b, const BaseArgs& f, float* workspace, bool pdl, cudaStream_t stream) {
  float* sw = workspace + p.sw_off;
  float* tpart = workspace + p.tpart_off;
  float* part = workspace + p.part_off;
  int* counters = reinterpret_cast<int*>(workspace + p.counter_off);
  const bool fused = f.base[0] != nullptr;
  if (b.J > 0) {
    const int gx = shrink_ctas(p, K);
    const ShrinkArgs sa{x,        R,         n,       w,          K,        b.v_words,   b.v_scale,
                        b.v_offset, b.s,     b.rows,  b.J,        p.ntiles, p.kb_cta,    p.ktb,
                        sw,       tpart,     counters, p.ncounters, b.u_words, b.u_scale, b.u_offset,
                        b.u_nwords, b.u_nparams, b.spans, b.P, fused ? f.ready : nullptr};
    if (gx < p.groups) {  // its static tables beside an x tile of up to kShrinkSmemFloats can pass 48 KB
      const cudaError_t err = allow_dynamic_smem<shrink_kernel<scalar_t, 1, true>>(kShrinkSmemFloats * sizeof(float));
      if (err != cudaSuccess) return err;
    }
    const cudaError_t err =
        gx < p.groups ? launch_kernel(shrink_kernel<scalar_t, 1, true>, dim3(gx, p.ks, p.ntiles), p.shrink_smem, pdl,
                                      stream, sa)
                      : launch_kernel(shrink_kernel<scalar_t, R_TILE>, dim3(gx, p.ks, p.ntiles), p.shrink_smem, pdl,
                                      stream, sa);
    if (err != cudaSuccess) return err;
  }
  float* base_plane = workspace + p.base_off;
  const ExpandArgs ea{y,        out,      part,     counters, R,      M,       b.u_words,
                      b.u_scale, b.u_offset, b.rows, b.projs, b.spans, w,      b.P,
                      b.J,      K,        sw,       tpart,    p.ks,   p.ntiles, p.nsplit,
                      fused ? 1 : 0, fused ? f.ready : nullptr};
  if (b.J == 0 && p.ncounters > 0) {  // no stage 1 to zero the counters
    const cudaError_t err = cudaMemsetAsync(counters, 0, static_cast<size_t>(p.ncounters) * sizeof(int), stream);
    if (err != cudaSuccess) return err;
  }
  // Integer products only in the two-kernel op: beside the base kernel they made the fused call slower (cuda/README).
  const auto expand = [&](auto kernel) {
    return launch_kernel(kernel, dim3(p.slots, p.nsplit, p.ntiles), 0, pdl, stream, ea);
  };
  if (!fused) return expand(expand_kernel<scalar_t, R_TILE, fold_params<scalar_t, R_TILE>()>);

  BaseKernelArgs ba{x, R, n, M, p.base_kchunk, {}, {}, b.P, f.base_vec, base_plane};
  for (int q = 0, end = 0; q < kMaxBaseProjs; ++q) {
    end += q < b.P ? f.base_rows[q] : 0;
    ba.weight[q] = f.base[q], ba.end[q] = end;
  }
  if (b.J > 0) {  // without rank rows there are no planes to add
    const cudaError_t err = expand(expand_kernel<scalar_t, R_TILE, false>);
    if (err != cudaSuccess) return err;
  }
  // The base kernel reads x at once: without a stage 1 ahead of it (late trigger) it must not start early.
  const cudaError_t err = launch_kernel(base_kernel<scalar_t, R_TILE, kBaseRowsPerWarp>,
                                        dim3(p.base_blocks, p.ntiles, p.base_ks), 0, pdl && b.J > 0, stream, ba);
  if (err != cudaSuccess) return err;
  const FinishArgs fa{y, out, base_plane, part, p.base_ks, b.J > 0 ? p.nsplit : 0, R, M,
                      f.ready, b.J > 0 ? p.groups * p.ntiles : 0};
  const int64_t total = static_cast<int64_t>(R) * M;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(total, kThreads), 65535));
  return launch_kernel(finish_kernel<scalar_t>, dim3(blocks), 0, pdl, stream, fa);
}

template <typename scalar_t>
cudaError_t launch_typed(const Plan& p, const void* x, const void* y, void* out, int R, int n, int M, const float* w,
                         int K, const Bank& b, const BaseArgs& f, float* workspace, bool pdl, cudaStream_t stream) {
  switch (p.r_tile) {
    case 1: return launch_tiled<scalar_t, 1>(p, x, y, out, R, n, M, w, K, b, f, workspace, pdl, stream);
    case 2: return launch_tiled<scalar_t, 2>(p, x, y, out, R, n, M, w, K, b, f, workspace, pdl, stream);
    case 4: return launch_tiled<scalar_t, 4>(p, x, y, out, R, n, M, w, K, b, f, workspace, pdl, stream);
    case 8: return launch_tiled<scalar_t, 8>(p, x, y, out, R, n, M, w, K, b, f, workspace, pdl, stream);
    default: return launch_tiled<scalar_t, 16>(p, x, y, out, R, n, M, w, K, b, f, workspace, pdl, stream);
  }
}

cudaError_t launch_any(int dtype, const Plan& p, const void* x, const void* y, void* out, int64_t R, int64_t n,
                       int64_t M, const float* w, int64_t K, const Bank& b, const BaseArgs& f, float* workspace,
                       bool pdl, cudaStream_t stream) {
  const int iR = static_cast<int>(R), in = static_cast<int>(n), iM = static_cast<int>(M), iK = static_cast<int>(K);
  switch (dtype) {
    case 0: return launch_typed<float>(p, x, y, out, iR, in, iM, w, iK, b, f, workspace, pdl, stream);
    case 1: return launch_typed<__half>(p, x, y, out, iR, in, iM, w, iK, b, f, workspace, pdl, stream);
    case 2: return launch_typed<__nv_bfloat16>(p, x, y, out, iR, in, iM, w, iK, b, f, workspace, pdl, stream);
    default: return cudaErrorInvalidValue;
  }
}

// The one-row kernel takes a call of one token row whose x fits in shared memory when its grid, one wave
// (kRowCtasPerSm per SM, since a CTA holds its slot through its wait), gives each CTA one slice of 16 outputs, or a
// few whose delta tails walk few rank rows in all. A CTA takes consecutive slices of one projection, and each slice's
// delta tail (every rank row of the projection: its metadata, c and words) comes after the slice's base product;
// the CTAs, all in step, leave DRAM idle meanwhile. Measured on an H200 at Llama-2-7B shapes (1 bit per entry,
// 1 row, bf16, per call) against the four kernels: o and down (1 slice a CTA; 1,000 and 1,470 rank rows)
// 18.5 and 37.2 us against 26.3 and 43.6; q|k|v (3 slices, 1,000 rows) 44.9 against 47.4; gate|up (6 slices, 1,470
// rows) 107.0 against 68.0; with four gated deltas (four times the rows) q|k|v lost too (the 7B step 3.30x the base's
// against 3.06x).
// With U by block column (col_len > 0) the tail decodes from shared memory in one pass over the rank rows for all
// of a CTA's slices, so up to kColMaxSlices slices a CTA take the one kernel when their columns fit.
constexpr int64_t kRowMaxWalk = 4096;  // slices per CTA x rank rows per projection, with more than one slice

int64_t row_wave(int num_sms) { return static_cast<int64_t>(kRowCtasPerSm) * (num_sms > 0 ? num_sms : 1); }

int64_t row_slices_per_cta(int64_t M, int64_t P, int num_sms) {
  return ceil_div<int64_t>((M + kRowSlice - 1) / kRowSlice + P, row_wave(num_sms));
}

// Block columns that `slices` consecutive slices of 16 outputs (starting on a multiple of 16) can touch.
int64_t col_blocks(int64_t slices) { return slices / 2 + 1; }

// Shared-memory words a one-row CTA may give U's columns beside x (n inputs) on the current device: what
// kRowCtasPerSm CTAs an SM leave, at most kColMaxWords.
int64_t col_room(int64_t n) {
  static std::atomic<int> per_sm[64];
  int device = 0, sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device < 64) sm = per_sm[device].load();
  if (sm == 0 && cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess)
    return 0;
  if (device < 64) per_sm[device].store(sm);
  const int64_t room =
      (static_cast<int64_t>(sm) / kRowCtasPerSm - kRowStaticSmem) / 4 - row_x_floats(static_cast<int>(n));
  return std::min(room, kColMaxWords);
}

// Shared-memory words for a call's columns (0: none, or they do not fit): col_len, the longest column, times the
// block columns a CTA's share of slices can touch; with K > 1 deltas twice that (one segment's columns land while the
// other's are decoded: one at a time, each copy exposed, lost to the four kernels on the H200).
int64_t col_cap(int64_t n, int64_t M, int64_t P, int num_sms, int64_t col_len, int64_t K) {
  if (col_len <= 0) return 0;
  const int64_t need = col_blocks(row_slices_per_cta(M, P, num_sms)) * col_len * (K > 1 ? 2 : 1);
  return need <= col_room(n) ? need : 0;
}

bool row_path(int64_t R, int64_t n, int64_t M, int64_t J, int64_t P, int num_sms, int64_t col_len, int64_t K) {
  if (R != 1 || n > kRowMaxN) return false;
  const int64_t per_cta = row_slices_per_cta(M, P, num_sms);
  if (per_cta <= 1 || (per_cta <= kRowMaxSlices && per_cta * J <= kRowMaxWalk * P)) return true;
  return per_cta <= kColMaxSlices && col_cap(n, M, P, num_sms, col_len, K) > 0;
}

// Projection p gets CTAs in proportion to its slices of W outputs (every slice its own CTA when they fit in one
// wave), at least one each; the kernel splits a projection's slices evenly over its CTAs.
template <typename scalar_t, bool MULTI>
cudaError_t launch_row(RowArgs a, int num_sms, bool pdl, cudaStream_t stream) {
  constexpr int W = kRowSlice;
  int64_t slices[kMaxBaseProjs] = {}, total = 0;
  for (int q = 0, lo = 0; q < a.b.P; ++q) {
    slices[q] = ceil_div(a.end[q] - lo, W);
    total += slices[q];
    lo = a.end[q];
  }
  if (total == 0) return cudaSuccess;
  const int64_t wave = row_wave(num_sms);
  int ctas = 0;
  for (int q = 0; q < kMaxBaseProjs; ++q) {
    int64_t cq = slices[q];
    if (total + a.b.P > wave && cq > 0) cq = std::min(cq, std::max<int64_t>(1, wave * cq / total));
    ctas += static_cast<int>(cq);
    a.cta_end[q] = ctas;
  }
  a.col_cap = a.cu.cols != nullptr
                  ? static_cast<int>(col_cap(a.n, a.end[a.b.P - 1], a.b.P, num_sms, a.cu.longest, a.K))
                  : 0;
  // Past 48 KB of static and dynamic shared memory together (kRowStaticSmem bounding the static part).
  const int smem = (row_x_floats(a.n) + a.col_cap) * static_cast<int>(sizeof(float));
  if (smem + kRowStaticSmem > 48 * 1024) {
    const cudaError_t err = allow_dynamic_smem<row_kernel<scalar_t, MULTI>>(smem);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(row_kernel<scalar_t, MULTI>, dim3(ctas), smem, pdl, stream, a);
}

// The one-row kernel's workspace: J c values, then (with U by block column) J 16-byte records from this float on.
size_t row_rec_offset(int64_t J) { return (static_cast<size_t>(J) + 3) / 4 * 4; }

}  // namespace

// The entry points (documented in delta_linear.h).

size_t delta_linear_workspace_floats(int64_t R, int64_t n, int64_t M, int64_t J, int64_t P, int num_sms,
                                     int64_t row_tile, bool fused, int64_t col_len, int64_t K) {
  if (R <= 0 || M <= 0) return 0;
  if (fused && row_path(R, n, M, J, P, num_sms, col_len, K))  // c values, and with columns the tail's records
    return row_rec_offset(J) + (col_len > 0 ? 4 * static_cast<size_t>(J) : 0);
  return make_plan(R, n, M, J, P, num_sms, row_tile, fused).total;
}

size_t delta_linear_base_ready_ints(int64_t R, int64_t n, int64_t M, int64_t J, int64_t P, int num_sms,
                                    int64_t col_len, int64_t K) {
  if (R <= 0 || M <= 0 || J <= 0) return 0;
  if (row_path(R, n, M, J, P, num_sms, col_len, K)) return kRowCounters;
  const Plan p = make_plan(R, n, M, J, P, num_sms, 0, true);
  return static_cast<size_t>(p.groups) * p.ntiles;
}

cudaError_t delta_linear_launch(int dtype, const void* x, const void* y, void* out, int64_t R, int64_t n, int64_t M,
                                const float* w, int64_t K, const int32_t* v_words, const void* v_scale,
                                const void* v_offset, const int32_t* u_words, const void* u_scale,
                                const void* u_offset, int64_t u_nwords, int64_t u_nparams, const float* s,
                                const int32_t* rows, int64_t J, const int32_t* projs, const int32_t* spans, int64_t P,
                                float* workspace, int num_sms, int64_t row_tile, bool pdl, cudaStream_t stream) {
  if (R <= 0 || M <= 0) return cudaSuccess;
  const Plan p = make_plan(R, n, M, J, P, num_sms, row_tile);
  const Bank b = make_bank(v_words, v_scale, v_offset, u_words, u_scale, u_offset, u_nwords, u_nparams, s, rows, J,
                           projs, spans, P);
  const BaseArgs f{{}, {}, 0, nullptr};
  return launch_any(dtype, p, x, y, out, R, n, M, w, K, b, f, workspace, pdl, stream);
}

cudaError_t delta_linear_base_launch(int dtype, const void* x, const void* const* base, const int64_t* base_rows,
                                     const void* bias, void* out, int64_t R, int64_t n, int64_t M, const float* w,
                                     int64_t K, const int32_t* v_words, const void* v_scale, const void* v_offset,
                                     const int32_t* u_words, const void* u_scale, const void* u_offset,
                                     int64_t u_nwords, int64_t u_nparams, const float* s, const int32_t* rows,
                                     int64_t J, const int32_t* projs, const int32_t* spans, int64_t P,
                                     float* workspace, int* ready, int num_sms, bool pdl, cudaStream_t stream,
                                     const ColumnU* columns) {
  if (R <= 0 || M <= 0) return cudaSuccess;
  if (P < 1 || P > kMaxBaseProjs || (J > 0 && ready == nullptr)) return cudaErrorInvalidValue;
  const size_t esize = dtype == 0 ? 4 : 2;
  bool vec = (n * esize) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  for (int64_t q = 0; q < P; ++q) vec = vec && reinterpret_cast<uintptr_t>(base[q]) % 16 == 0;
  const Bank b = make_bank(v_words, v_scale, v_offset, u_words, u_scale, u_offset, u_nwords, u_nparams, s, rows, J,
                           projs, spans, P);
  const ColumnU cu = columns != nullptr ? *columns : ColumnU{};
  if (row_path(R, n, M, J, P, num_sms, cu.cols != nullptr ? cu.longest : 0, K)) {
    RowArgs a{x, static_cast<int>(n), static_cast<int>(K), vec ? 1 : 0, {}, {}, {}, bias, out, w, b, workspace,
              nullptr, J > 0 ? ready : nullptr, cu, 0};
    if (cu.cols != nullptr) a.rec = reinterpret_cast<int4*>(workspace + row_rec_offset(J));
    for (int q = 0, end = 0; q < kMaxBaseProjs; ++q) {
      end += q < P ? static_cast<int>(base_rows[q]) : 0;
      a.weight[q] = q < P ? base[q] : base[0], a.end[q] = end;
    }
    const bool multi = K > 1;
    switch (dtype) {
      case 0: return multi ? launch_row<float, true>(a, num_sms, pdl, stream)
                           : launch_row<float, false>(a, num_sms, pdl, stream);
      case 1: return multi ? launch_row<__half, true>(a, num_sms, pdl, stream)
                           : launch_row<__half, false>(a, num_sms, pdl, stream);
      case 2: return multi ? launch_row<__nv_bfloat16, true>(a, num_sms, pdl, stream)
                           : launch_row<__nv_bfloat16, false>(a, num_sms, pdl, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  const Plan p = make_plan(R, n, M, J, P, num_sms, 0, true);
  BaseArgs f{{}, {}, 0, ready};
  for (int64_t q = 0; q < P; ++q) {
    f.base[q] = base[q];
    f.base_rows[q] = static_cast<int>(base_rows[q]);
  }
  f.base_vec = vec ? 1 : 0;
  return launch_any(dtype, p, x, bias, out, R, n, M, w, K, b, f, workspace, pdl, stream);
}

}  // namespace deltacomp
