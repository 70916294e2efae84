// Host entry points of the delta bank dequant-matmul (defined in delta_linear.cu, called by binding.cpp and
// check_standalone.cu). No torch dependency.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace deltacomp {

// U by block column, an optional companion of a bank of layout 2 for delta_linear_base_launch (cuda/README.md): for
// segment q = p * K + d (delta d's rank rows of projection p, K deltas), block column b (outputs 32 b .. 32 b + 31 of
// the projection) holds, for every rank row j of the segment in bank order, the row's words of block b (`rows[j][3]`
// of them) from word col_off(j) = the sum of the widths of the segment's rows before j. Column b of q starts at word
// info[3 q] + b * info[3 q + 1] of `cols` (the column length, a multiple of 4 words, and the start, 16-byte aligned).
// desc[j] = width | col_off(j) << 4; pair[j] = the row's fp16 scale | fp16 offset << 16 (its first parameter group);
// info[3 q + 2] != 0 when every row of q has one parameter group. `longest`: the most words of a column (the largest
// info[3 q + 1]). Device pointers; all null: none.
struct ColumnU {
  const int32_t* cols = nullptr;
  const int32_t* desc = nullptr;
  const uint32_t* pair = nullptr;
  const int32_t* info = nullptr;
  int longest = 0;
};

// fp32 workspace (in floats) that delta_linear_launch (fused = false) or delta_linear_base_launch (fused = true)
// needs for these shapes; num_sms and row_tile as in the launch, col_len the `longest` of its columns (0: none), K
// the deltas of the bank.
size_t delta_linear_workspace_floats(int64_t R, int64_t n, int64_t M, int64_t J, int64_t P, int num_sms,
                                     int64_t row_tile, bool fused = false, int64_t col_len = 0, int64_t K = 1);

// out (R, M) = y + the bank's contribution, for x (R, n), y (R, M) of `dtype` (0 float32, 1 float16, 2 bfloat16),
// w (R, K) float32, the bank tensors of layout 2 (u_nwords and u_nparams: the lengths of u_words and u_scale), and a
// workspace of delta_linear_workspace_floats() floats. row_tile caps the token-row tile (0: none); pdl launches with
// programmatic dependent launch (sm_90 and later). All pointers are device pointers of the current device; sizes
// must fit in int32 (binding.cpp checks). Enqueues 1 or 2 kernels on `stream`; returns the first launch error.
cudaError_t delta_linear_launch(int dtype, const void* x, const void* y, void* out, int64_t R, int64_t n, int64_t M,
                                const float* w, int64_t K, const int32_t* v_words, const void* v_scale,
                                const void* v_offset, const int32_t* u_words, const void* u_scale,
                                const void* u_offset, int64_t u_nwords, int64_t u_nparams, const float* s,
                                const int32_t* rows, int64_t J, const int32_t* projs, const int32_t* spans, int64_t P,
                                float* workspace, int num_sms, int64_t row_tile, bool pdl, cudaStream_t stream);

// int32 counters that delta_linear_base_launch needs for these shapes (0 for an empty bank); col_len and K as above.
size_t delta_linear_base_ready_ints(int64_t R, int64_t n, int64_t M, int64_t J, int64_t P, int num_sms,
                                    int64_t col_len = 0, int64_t K = 1);

// The fused form: out (R, M) = x @ base^T (+ bias) + the bank's contribution, where base[p] (base_rows[p], n) of
// `dtype` is projection p's base weight (P <= 8; their rows, in order, are the M outputs, which the projections cover
// in the same order) and bias (M,) may be null. The base product accumulates in fp32 and is rounded once with the
// delta. At one row (inputs of at most 20480) one kernel computes both; otherwise the base product runs in a kernel
// of its own beside the delta's stages, in row tiles of up to 16 rows (the base weights are read once per tile).
// `ready` holds delta_linear_base_ready_ints() int32 counters that are zero when the call starts
// (in stream order) and that it leaves zero: a buffer kept per stream, zeroed once (null only for an empty bank).
// `columns` (optional, one delta) lets the one-row kernel stage each CTA's share of U in a few coalesced copies
// (the workspace and counters then sized with col_len = columns->longest).
cudaError_t delta_linear_base_launch(int dtype, const void* x, const void* const* base, const int64_t* base_rows,
                                     const void* bias, void* out, int64_t R, int64_t n, int64_t M, const float* w,
                                     int64_t K, const int32_t* v_words, const void* v_scale, const void* v_offset,
                                     const int32_t* u_words, const void* u_scale, const void* u_offset,
                                     int64_t u_nwords, int64_t u_nparams, const float* s, const int32_t* rows,
                                     int64_t J, const int32_t* projs, const int32_t* spans, int64_t P,
                                     float* workspace, int* ready, int num_sms, bool pdl, cudaStream_t stream,
                                     const ColumnU* columns = nullptr);

}  // namespace deltacomp
