// oneDNN convolutions (forward, backward data, backward weights) as XLA FFI custom calls.
//
// Built on first use by unet_ds/models/ops/onednn.py (g++, oneDNN from the onednn-cpu-gomp wheel).
// Layouts are the model's: activations channels-last (NHWC / NDHWC), kernels in flax layout
// (*k, C_in, C_out), float32. Primitives are cached per problem (shapes, strides, padding); a
// call wraps the XLA buffers without copies, reorders the kernel (or its gradient) where the
// primitive wants another layout, and runs the primitive on oneDNN's OpenMP threads.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::format_tag ActivationTag(size_t rank) {
  return rank == 5 ? memory::format_tag::ndhwc : memory::format_tag::nhwc;
}

memory::format_tag KernelTag(size_t rank) {
  return rank == 5 ? memory::format_tag::dhwio : memory::format_tag::hwio;
}

// Channels-last XLA dims [N, *spatial, C] -> oneDNN logical dims [N, C, *spatial].
memory::dims ActivationDims(ffi::Span<const int64_t> d) {
  memory::dims out = {d[0], d[d.size() - 1]};
  for (size_t i = 1; i + 1 < d.size(); ++i) out.push_back(d[i]);
  return out;
}

// Flax kernel dims [*k, I, O] -> oneDNN logical dims [O, I, *k].
memory::dims KernelDims(ffi::Span<const int64_t> d) {
  size_t r = d.size();
  memory::dims out = {d[r - 1], d[r - 2]};
  for (size_t i = 0; i + 2 < r; ++i) out.push_back(d[i]);
  return out;
}

// One buffer of a call: its plain layout in XLA, the primitive's layout, its argument slot.
struct Operand {
  memory::desc user, want;
  int arg;
};

// One primitive with its two inputs and one output.
struct Step {
  dnnl::primitive prim;
  Operand in0, in1, out;
};

struct Problem {
  Kind kind;
  memory::dims src, wei, dst, strides, lo, hi;
  size_t rank;
};

std::string Key(const Problem& p) {
  std::string key = std::to_string(p.kind);
  for (const memory::dims* v : {&p.src, &p.wei, &p.dst, &p.strides, &p.lo, &p.hi}) {
    key += '|';
    for (auto x : *v) key += std::to_string(x) + ',';
  }
  return key;
}

Step Build(const Problem& p) {
  auto& eng = Engine();
  auto any = memory::format_tag::any;
  auto f32 = memory::data_type::f32;
  // Activations stay channels-last (oneDNN's brgemm kernels run "nspc" directly: no reorder of
  // the volume, ~1.4x faster than blocked layouts plus reorders here); kernels are tiny, so
  // they may be reordered to whatever the primitive prefers.
  memory::desc src(p.src, f32, ActivationTag(p.rank)), dst(p.dst, f32, ActivationTag(p.rank));
  memory::desc wei_md(p.wei, f32, any), wei_user(p.wei, f32, KernelTag(p.rank));
  auto alg = dnnl::algorithm::convolution_direct;
  auto fwd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, alg, src, wei_md, dst, p.strides, p.lo,
      p.hi);
  Step s;
  if (p.kind == kForward) {
    s = {dnnl::convolution_forward(fwd), {src, fwd.src_desc(), DNNL_ARG_SRC},
         {wei_user, fwd.weights_desc(), DNNL_ARG_WEIGHTS}, {dst, fwd.dst_desc(), DNNL_ARG_DST}};
  } else if (p.kind == kBackwardData) {
    auto bwd = dnnl::convolution_backward_data::primitive_desc(
        eng, alg, src, wei_md, dst, p.strides, p.lo, p.hi, fwd);
    s = {dnnl::convolution_backward_data(bwd),
         {dst, bwd.diff_dst_desc(), DNNL_ARG_DIFF_DST},
         {wei_user, bwd.weights_desc(), DNNL_ARG_WEIGHTS},
         {src, bwd.diff_src_desc(), DNNL_ARG_DIFF_SRC}};
  } else {
    auto bwd = dnnl::convolution_backward_weights::primitive_desc(
        eng, alg, src, wei_md, dst, p.strides, p.lo, p.hi, fwd);
    s = {dnnl::convolution_backward_weights(bwd), {src, bwd.src_desc(), DNNL_ARG_SRC},
         {dst, bwd.diff_dst_desc(), DNNL_ARG_DIFF_DST},
         {wei_user, bwd.diff_weights_desc(), DNNL_ARG_DIFF_WEIGHTS}};
  }
  return s;
}

// Runs `step` on the user buffers, reordering where the primitive's layout differs.
void Run(const Step& s, void* in0, void* in1, void* out) {
  auto& eng = Engine();
  dnnl::stream stream(eng);
  auto input = [&](const Operand& op, void* data) {
    memory user(op.user, eng, data);
    if (op.want == op.user) return user;
    memory m(op.want, eng);
    dnnl::reorder(user, m).execute(stream, user, m);
    return m;
  };
  memory a = input(s.in0, in0), b = input(s.in1, in1);
  memory out_user(s.out.user, eng, out);
  memory o = s.out.want == s.out.user ? out_user : memory(s.out.want, eng);
  s.prim.execute(stream, {{s.in0.arg, a}, {s.in1.arg, b}, {s.out.arg, o}});
  if (!(s.out.want == s.out.user)) dnnl::reorder(o, out_user).execute(stream, o, out_user);
  stream.wait();
}

std::mutex& Mutex() {
  static std::mutex mu;
  return mu;
}

const Step& Cached(const Problem& p) {
  static std::map<std::string, std::unique_ptr<Step>> cache;
  std::string key = Key(p);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, std::make_unique<Step>(Build(p))).first;
  return *it->second;
}

memory::dims ToDims(ffi::Span<const int64_t> v) { return memory::dims(v.begin(), v.end()); }

ffi::Error Conv(Kind kind, ffi::Span<const int64_t> src_dims, ffi::Span<const int64_t> wei_dims,
                ffi::Span<const int64_t> dst_dims, void* in0, void* in1, void* out,
                ffi::Span<const int64_t> strides, ffi::Span<const int64_t> lo,
                ffi::Span<const int64_t> hi) {
  size_t rank = src_dims.size();
  if ((rank != 4 && rank != 5) || wei_dims.size() != rank || dst_dims.size() != rank ||
      strides.size() != rank - 2 || lo.size() != rank - 2 || hi.size() != rank - 2) {
    return ffi::Error::InvalidArgument("unet_ds onednn conv: inconsistent ranks");
  }
  Problem p{kind, ActivationDims(src_dims), KernelDims(wei_dims), ActivationDims(dst_dims),
            ToDims(strides), ToDims(lo), ToDims(hi), rank};
  try {
    std::lock_guard<std::mutex> lock(Mutex());
    Run(Cached(p), in0, in1, out);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("unet_ds onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Forward(F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y, Ints strides, Ints lo, Ints hi) {
  return Conv(kForward, x.dimensions(), w.dimensions(), y->dimensions(), x.untyped_data(),
              w.untyped_data(), y->untyped_data(), strides, lo, hi);
}

ffi::Error BackwardData(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32> dx, Ints strides, Ints lo,
                        Ints hi) {
  return Conv(kBackwardData, dx->dimensions(), w.dimensions(), dy.dimensions(),
              dy.untyped_data(), w.untyped_data(), dx->untyped_data(), strides, lo, hi);
}

ffi::Error BackwardWeights(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw, Ints strides, Ints lo,
                           Ints hi) {
  return Conv(kBackwardWeights, x.dimensions(), dw->dimensions(), dy.dimensions(),
              x.untyped_data(), dy.untyped_data(), dw->untyped_data(), strides, lo, hi);
}

}  // namespace

#define UNET_DS_CONV_HANDLER(symbol, impl)                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                               \
                                ffi::Ffi::Bind()                            \
                                    .Arg<F32>()                             \
                                    .Arg<F32>()                             \
                                    .Ret<F32>()                             \
                                    .Attr<Ints>("strides")                  \
                                    .Attr<Ints>("pad_lo")                   \
                                    .Attr<Ints>("pad_hi"));

UNET_DS_CONV_HANDLER(UnetDsConvForward, Forward)
UNET_DS_CONV_HANDLER(UnetDsConvBackwardData, BackwardData)
UNET_DS_CONV_HANDLER(UnetDsConvBackwardWeights, BackwardWeights)
