// Host entry point of GPTQ's block step (defined in gptq_block.cu, called by binding.cpp). No torch dependency.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deltacomp {

constexpr int kGptqBlock = 128;  // the most columns one block step quantizes

// One block step of GPTQ (deltacomp/quant/gptq.py, gptq_core) over columns [start, start + width) of a row-major
// (rows, cols) float32 problem: each row r quantizes its columns in order,
//   q = min(max(round((w - offset) / scale), 0), maxq);  e = (w - (q * scale + offset)) / hinv[i][i]
// and subtracts e * hinv[i][j] from its later columns j of the block. codes[r][start + i] = q and err[r][i] = e
// (err is (rows, width)). w is read, not written; hinv is (cols, cols), the upper Cholesky factor of H^-1.
// width is 1..kGptqBlock. Launches on `stream`, never synchronises.
cudaError_t gptq_block_launch(const float* w, const float* hinv, const float* scale, const float* offset,
                              const float* maxq, float* codes, float* err, int64_t rows, int64_t cols, int64_t start,
                              int width, cudaStream_t stream);

}  // namespace deltacomp
