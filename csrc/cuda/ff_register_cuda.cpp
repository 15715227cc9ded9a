// Registers the CUDA kernels of the ffkernels ops for the CUDA dispatch key (the schemas, option parsing
// and argument checks are python_api/ff_api.cpp's; this file only says which kernels run on CUDA tensors).
#include "../../python_api/ff_ops.h"

namespace ffk {
namespace {

// bf16 and fp16 GEMMs and convolutions for float32 weights (torch.autocast: cuBLAS/cuDNN with fp32 accumulation), the
// conv step registered (ff_conv_cuda.cu)
constexpr DeviceKernels kCudaKernels{"CUDA", /*half_precision=*/true, &ff_grad_cuda, &ff_update_cuda,
                                     &ff_grad_labeled_cuda, /*bf16_gemm=*/true, &ff_conv_grad_cuda,
                                     /*fp16_gemm=*/true};

}  // namespace
}  // namespace ffk

TORCH_LIBRARY_IMPL(ffkernels, CUDA, m) { ffk::register_ops<ffk::kCudaKernels>(m); }
