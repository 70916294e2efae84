// GPTQ's block step as one kernel (see gptq_block.h). The rows of a block step are independent: a CTA owns 32 rows
// and walks the block's columns in order, one thread a row, with the rows' block of columns and the block of the
// inverse Hessian's Cholesky factor (upper triangle, shared by all rows) in shared memory. Rows are read and codes
// and errors written in coalesced passes. On a GPU the same step through torch launches about ten kernels a column;
// this is one launch a block.

#include "gptq_block.h"

namespace deltacomp {
namespace {

constexpr int kRows = 32;  // rows per CTA (one warp): small, so that a few thousand rows still spread over every SM
constexpr int kPitch = kRows + 1;  // shared row-block pitch: column-wise and row-wise passes both conflict-free
constexpr int kTriangle = kGptqBlock * (kGptqBlock + 1) / 2;
constexpr size_t kShared = (kTriangle + 2 * kGptqBlock * kPitch) * sizeof(float);

// Where entry (i, j), j >= i, of the block's upper triangle lies in shared memory (row by row).
__device__ __forceinline__ int tri(int i, int j) { return i * kGptqBlock - i * (i - 1) / 2 + (j - i); }

__global__ void __launch_bounds__(kRows) gptq_block_kernel(const float* __restrict__ w, const float* __restrict__ hinv,
                                                          const float* __restrict__ scale,
                                                          const float* __restrict__ offset,
                                                          const float* __restrict__ maxq, float* __restrict__ codes,
                                                          float* __restrict__ err, int64_t rows, int64_t cols,
                                                          int64_t start, int width) {
  extern __shared__ float smem[];
  float* h = smem;                                // upper triangle of the block of hinv
  float* xs = smem + kTriangle;                   // xs[j * kPitch + t]: column j of the CTA's row t; then its code
  float* es = xs + kGptqBlock * kPitch;           // es[j * kPitch + t]: the error of column j of row t
  const int t = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int here = static_cast<int>(rows - row0 < kRows ? rows - row0 : kRows);
  for (int i = 0; i < width; ++i)
    for (int j = i + t; j < width; j += kRows) h[tri(i, j)] = hinv[(start + i) * cols + start + j];
  for (int k = t; k < here * width; k += kRows) {  // consecutive threads: consecutive columns of a row
    const int rr = k / width, j = k % width;
    xs[j * kPitch + rr] = w[(row0 + rr) * cols + start + j];
  }
  __syncthreads();
  if (t < here) {
    const int64_t at = (row0 + t) * cols + start;
    for (int i = 0; i < width; ++i) {
      const float xi = xs[i * kPitch + t], s = scale[at + i], o = offset[at + i];
      // as torch computes it: round half to even, clamped below at 0, then at maxq; each operation rounded once
      const float q = fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(xi, o), s)), 0.f), maxq[at + i]);
      const float e = __fdiv_rn(__fsub_rn(xi, __fadd_rn(__fmul_rn(q, s), o)), h[tri(i, i)]);
      xs[i * kPitch + t] = q;
      es[i * kPitch + t] = e;
      const float* hi = h + tri(i, 0);  // hi[j] = entry (i, j) for j >= i
#pragma unroll 8
      for (int j = i + 1; j < width; ++j) xs[j * kPitch + t] = __fsub_rn(xs[j * kPitch + t], __fmul_rn(e, hi[j]));
    }
  }
  __syncthreads();
  for (int k = t; k < here * width; k += kRows) {
    const int rr = k / width, j = k % width;
    codes[(row0 + rr) * cols + start + j] = xs[j * kPitch + rr];
    err[(row0 + rr) * width + j] = es[j * kPitch + rr];
  }
}

}  // namespace

cudaError_t gptq_block_launch(const float* w, const float* hinv, const float* scale, const float* offset,
                              const float* maxq, float* codes, float* err, int64_t rows, int64_t cols, int64_t start,
                              int width, cudaStream_t stream) {
  if (rows == 0 || width <= 0) return cudaSuccess;
  cudaError_t status = cudaFuncSetAttribute(gptq_block_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kShared));
  if (status != cudaSuccess) return status;
  const int64_t blocks = (rows + kRows - 1) / kRows;
  gptq_block_kernel<<<static_cast<unsigned>(blocks), kRows, kShared, stream>>>(w, hinv, scale, offset, maxq, codes,
                                                                             err, rows, cols, start, width);
  return cudaGetLastError();
}

}  // namespace deltacomp
