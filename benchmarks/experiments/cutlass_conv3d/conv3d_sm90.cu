// CUTLASS 3.x sm90 implicit-GEMM conv3d fprop (wgmma + TMA im2col), bf16 in / fp32 accumulate /
// bf16 out, per-output-channel bias in the epilogue. Experiment for issue 14 (not in the shipped build).
//
// GEMM view (fprop): M = N*Z*P*Q output pixels, N = K output channels, K = T*R*S*C. Operand A (the
// activation) is loaded by TMA in im2col mode: the hardware walks the (t, r, s) filter offsets and
// zero-fills out-of-bounds pixels, so the spatial padding costs nothing and needs no padded copy.
// Operand B (the KTRSC filter) is a plain tiled TMA load, multicast across a cluster along M.
//
// What CUTLASS 4.2 offers for sm90 conv: only the non-persistent warp-specialized kernel
// (KernelImplicitTmaWarpSpecializedSm90: one producer warpgroup + one MMA warpgroup per CTA).
// The Cooperative / Pingpong schedules are accepted by the collective builder but rejected by
// MainloopSm90TmaGmmaWarpSpecializedImplicitGemm ("Persistent schedules not support for conv yet.");
// compile with -DCONV3D_TRY_COOPERATIVE to see that static_assert.
//
// Build (offline, no GPU needed): see README.md in this folder.

#include "conv3d_sm90.h"

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/kernel_hardware_info.hpp"  // the sm100 conv collective (pulled in by the builder header) needs it first
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"

namespace cutlass_conv3d {
namespace {

using namespace cute;

// Stages = 0: as many mainloop stages as fit beside the epilogue's shared memory.
template <class TileShapeMNK, class ClusterShapeMNK, class MainloopSchedule, int Stages = 0>
struct Conv3dFprop {
  using Element = cutlass::bfloat16_t;  // activation, filter, output and bias
  using ElementAcc = float;
  using Layout = cutlass::layout::TensorNDHWC;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA rows

  // D = acc + bias[k] (alpha 1, no source tensor C: ElementC = void skips its load entirely).
  using FusionOp = cutlass::epilogue::fusion::LinCombPerColBias<Element, float, Element, Element, float>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShapeMNK, ClusterShapeMNK,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
      void, Layout, kAlign,
      Element, Layout, kAlign,
      cutlass::epilogue::TmaWarpSpecialized, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
      Element, Layout, kAlign,
      Element, Layout, kAlign,
      ElementAcc, TileShapeMNK, ClusterShapeMNK,
      cute::conditional_t<Stages == 0,
          cutlass::conv::collective::StageCountAutoCarveout<
              static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
          cutlass::conv::collective::StageCount<Stages>>,
      MainloopSchedule>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<
      CollectiveMainloop::DispatchPolicy::ConvOp, CollectiveMainloop::DispatchPolicy::NumSpatialDimensions>;
  static_assert(ProblemShape::RankS == 3, "expected a 3D (NDHWC) convolution");
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;

  static int smem_bytes() { return static_cast<int>(Kernel::SharedStorageSize); }
  static int threads() { return static_cast<int>(Kernel::MaxThreadsPerBlock); }
  static int stages() { return CollectiveMainloop::DispatchPolicy::Stages; }

  static std::string run(const Problem& p, cudaStream_t stream) {
    using Stride5 = typename ProblemShape::TensorStride;
    Stride5 sx{}, sw{};
    for (int i = 0; i < 5; ++i) { sx[i] = p.x_stride[i]; sw[i] = p.w_stride[i]; }
    ProblemShape shape(cutlass::conv::Mode::kCrossCorrelation,
                       {p.n, p.d, p.h, p.w_, p.c}, sx,
                       {p.k, p.t, p.r, p.s, p.c}, sw,
                       {p.pad_d, p.pad_h, p.pad_w}, {p.pad_d, p.pad_h, p.pad_w},
                       {1, 1, 1}, {1, 1, 1}, 1);

    // Output (and the unused C) strides: packed NZPQK, M mode ordered (q, p, z, n).
    using StrideD = typename Kernel::StrideD;
    using StrideC = typename Kernel::StrideC;
    StrideD stride_d{};
    StrideC stride_c{};
    cute::for_each(cute::make_seq<cute::rank<0>(StrideD{})>{}, [&](auto i) {
      cute::get<0, i>(stride_d) = shape.stride_C[ProblemShape::RankT - 2 - i];
    });
    cute::for_each(cute::make_seq<cute::rank<0>(StrideC{})>{}, [&](auto i) {
      cute::get<0, i>(stride_c) = shape.stride_C[ProblemShape::RankT - 2 - i];
    });

    typename CollectiveEpilogue::Arguments epi{};
    epi.thread.alpha = 1.0f;
    epi.thread.beta = 0.0f;
    epi.thread.bias_ptr = static_cast<const Element*>(p.bias);
    epi.ptr_C = nullptr;
    epi.dC = stride_c;
    epi.ptr_D = static_cast<Element*>(p.y);
    epi.dD = stride_d;

    typename Conv::Arguments args{
        shape,
        {static_cast<const Element*>(p.x), static_cast<const Element*>(p.w)},
        epi};

    Conv conv;
    if (conv.can_implement(args) != cutlass::Status::kSuccess)
      return "cutlass can_implement refused the problem (alignment, TMA im2col corner/padding limits)";
    if (Conv::get_workspace_size(args) != 0)
      return "unexpected non-zero workspace";  // the non-persistent kernel needs none
    cutlass::Status st = conv.initialize(args, nullptr, stream);
    if (st != cutlass::Status::kSuccess)
      return std::string("initialize: ") + cutlassGetStatusString(st);
    st = conv.run(stream);
    if (st != cutlass::Status::kSuccess)
      return std::string("run: ") + cutlassGetStatusString(st);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return std::string("launch: ") + cudaGetErrorString(err);
    return "";
  }
};

using Tile128x128x64 = Shape<_128, _128, Shape<_64>>;
using Ws = cutlass::conv::KernelImplicitTmaWarpSpecializedSm90;

using Cfg0 = Conv3dFprop<Tile128x128x64, Shape<_1, _1, _1>, Ws>;
using Cfg1 = Conv3dFprop<Tile128x128x64, Shape<_2, _1, _1>, Ws>;  // filter tile multicast to 2 CTAs
// Smaller tile, 4 stages (~100 KB smem): aims at 2 CTAs per SM so that one CTA's epilogue overlaps the
// other's mainloop (what the missing persistent schedules would give); needs <= 128 registers.
using Cfg2 = Conv3dFprop<Shape<_128, _64, Shape<_64>>, Shape<_1, _1, _1>, Ws, 4>;

#ifdef CONV3D_TRY_COOPERATIVE
using CfgCoop = Conv3dFprop<Tile128x128x64, Shape<_1, _1, _1>,
                            cutlass::conv::KernelImplicitTmaWarpSpecializedSm90Cooperative>;
static_assert(sizeof(CfgCoop::Conv) > 0);
#endif

const char* const kNames[] = {
    "ws_128x128x64_c1x1",
    "ws_128x128x64_c2x1",
    "ws_128x64x64_c1x1_s4",
};

}  // namespace

int num_configs() { return 3; }

const char* config_name(int config) {
  return (config >= 0 && config < num_configs()) ? kNames[config] : "";
}

std::string describe(int config) {
  auto fmt = [](int smem, int threads, int stages) {
    return "dynamic smem " + std::to_string(smem) + " B, " + std::to_string(threads) + " threads, " +
           std::to_string(stages) + " mainloop stages";
  };
  switch (config) {
    case 0: return fmt(Cfg0::smem_bytes(), Cfg0::threads(), Cfg0::stages());
    case 1: return fmt(Cfg1::smem_bytes(), Cfg1::threads(), Cfg1::stages());
    case 2: return fmt(Cfg2::smem_bytes(), Cfg2::threads(), Cfg2::stages());
    default: return "";
  }
}

std::string run(int config, const Problem& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (config) {
    case 0: return Cfg0::run(p, s);
    case 1: return Cfg1::run(p, s);
    case 2: return Cfg2::run(p, s);
    default: return "unknown config " + std::to_string(config);
  }
}

}  // namespace cutlass_conv3d
