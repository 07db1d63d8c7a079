// The serialized form, read: a Linear4bit weight's tensors and quant-state JSON, every field checked
// against the others before anything trusts it.
#include <fmt/format.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "optimized/nf4/internal.hpp"
#include "optimized/nf4/nf4.hpp"
#include "core/json_bounded.hpp"

namespace moelab::nf4 {

using detail::ceil_div;

bool has_nf4_quant_state(const SafetensorsFile& f, const std::string& weight_name) {
  return f.contains(weight_name + kQuantStateSuffix);
}

namespace {

// The fields of the quant-state JSON that matter here, checked.
struct QuantStateJson {
  int blocksize = 0;
  std::string dtype;
  std::vector<int64_t> shape;
  bool nested = false;
  int nested_blocksize = 0;
  float offset = 0.0f;
};

QuantStateJson parse_quant_state(const SafetensorsFile& f, const TensorInfo& t) {
  auto bad = [&](const std::string& problem) {
    return Error(fmt::format("{}: tensor '{}': quant state JSON {}", f.path(), t.name, problem));
  };
  const auto bytes = f.bytes(t);
  nlohmann::json j;
  try {
    j = parse_json_bounded(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()),
                           fmt::format("{}: tensor '{}': quant state", f.path(), printable_name(t.name)));
  } catch (const nlohmann::json::exception& e) {
    throw bad(fmt::format("is not valid JSON ({})", e.what()));
  }
  if (!j.is_object()) throw bad("is not an object");
  auto field = [&](const char* key) -> const nlohmann::json& {
    if (!j.contains(key)) throw bad(fmt::format("has no \"{}\"", key));
    return j.at(key);
  };
  auto integer = [&](const char* key) {
    const auto& v = field(key);
    if (!v.is_number_integer()) throw bad(fmt::format("\"{}\" is not an integer", key));
    return v.get<int64_t>();
  };
  auto string = [&](const char* key) {
    const auto& v = field(key);
    if (!v.is_string()) throw bad(fmt::format("\"{}\" is not a string", key));
    return v.get<std::string>();
  };

  QuantStateJson s;
  if (const auto qt = string("quant_type"); qt != "nf4")
    throw bad(fmt::format("has quant_type \"{}\" (only nf4 is supported)", qt));
  const int64_t bs = integer("blocksize");
  if (bs > kBlocksizes.back() || !is_valid_blocksize(int(bs)))
    throw bad(fmt::format("has blocksize {} (allowed: 32, 64, ..., 4096)", bs));
  s.blocksize = int(bs);
  s.dtype = string("dtype");
  if (!detail::is_known_dtype(s.dtype)) throw bad(fmt::format("has dtype \"{}\" (float32, float16 or bfloat16 expected)", s.dtype));
  const auto& shape = field("shape");
  if (!shape.is_array() || shape.empty()) throw bad("\"shape\" is not a non-empty list");
  int64_t numel = 1;
  for (const auto& d : shape) {
    if (!d.is_number_integer() || d.get<int64_t>() <= 0) throw bad("\"shape\" has an entry that is not a positive integer");
    if (d.get<int64_t>() > (int64_t(1) << 50) / numel) throw bad("\"shape\" has more elements than any real tensor");
    numel *= d.get<int64_t>();
    s.shape.push_back(d.get<int64_t>());
  }
  s.nested = j.contains("nested_blocksize") || j.contains("nested_offset") || j.contains("nested_dtype");
  if (s.nested) {
    const int64_t nbs = integer("nested_blocksize");
    if (nbs > kBlocksizes.back() || !is_valid_blocksize(int(nbs))) throw bad(fmt::format("has nested_blocksize {}", nbs));
    s.nested_blocksize = int(nbs);
    if (const auto nd = string("nested_dtype"); nd != "float32")
      throw bad(fmt::format("has nested_dtype \"{}\" (float32 expected)", nd));
    const auto& off = field("nested_offset");
    if (!off.is_number()) throw bad("\"nested_offset\" is not a number");
    s.offset = static_cast<float>(off.get<double>());  // bitsandbytes: torch.tensor(float(...)), float32
  }
  return s;
}

class Nf4Reader {
 public:
  Nf4Reader(const TensorLookup& find, const std::string& weight_name) : find_(find), w_(weight_name) {}

  // The file and header entry of `name`; absent means the checkpoint is incomplete.
  std::pair<const SafetensorsFile*, const TensorInfo*> get(const std::string& name) const {
    const SafetensorsFile* f = find_(name);
    if (!f || !f->contains(name)) {
      const SafetensorsFile* wf = find_(w_);
      throw Error(fmt::format("{}: NF4 weight '{}' has no tensor '{}'", wf ? wf->path() : std::string("checkpoint"),
                              w_, name));
    }
    return {f, &f->info(name)};
  }

  // Checks dtype and shape, returns the raw bytes.
  std::span<const std::byte> expect(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const {
    const auto [f, t] = get(name);
    if (t->dtype != dtype || t->shape != shape)
      throw Error(fmt::format("{}: tensor '{}': expected {} {}, found {} {}", f->path(), name, dtype_name(dtype),
                              shape_str(shape), dtype_name(t->dtype), shape_str(t->shape)));
    return f->bytes(*t);
  }

  template <typename T>
  std::vector<T> read(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const {
    const auto bytes = expect(name, dtype, shape);
    std::vector<T> out(bytes.size() / sizeof(T));
    if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
    return out;
  }

  QuantizedTensor read_all() const {
    const auto [sf, st] = get(w_ + kQuantStateSuffix);
    if (st->dtype != DType::U8 || st->shape.size() != 1)
      throw Error(fmt::format("{}: tensor '{}': expected U8 [len], found {} {}", sf->path(), st->name,
                              dtype_name(st->dtype), shape_str(st->shape)));
    const QuantStateJson s = parse_quant_state(*sf, *st);

    QuantizedTensor q;
    q.shape = s.shape;
    q.dtype = s.dtype;
    q.blocksize = s.blocksize;
    const int64_t n = q.numel(), nb = q.nblocks();
    q.packed = read<uint8_t>(w_, DType::U8, {(n + 1) / 2, 1});
    check_quant_map();
    if (s.nested) {
      q.nested = true;
      q.nested_blocksize = s.nested_blocksize;
      q.offset = s.offset;
      q.qabsmax = read<uint8_t>(w_ + ".absmax", DType::U8, {nb});
      q.nested_absmax = read<float>(w_ + ".nested_absmax", DType::F32, {ceil_div(nb, s.nested_blocksize)});
      q.nested_code = read<float>(w_ + ".nested_quant_map", DType::F32, {256});
    } else {
      q.absmax = read<float>(w_ + ".absmax", DType::F32, {nb});
    }
    const SafetensorsFile* wf = find_(w_);
    validate(q, fmt::format("{}: NF4 weight '{}'", wf ? wf->path() : std::string("checkpoint"), printable_name(w_)));
    return q;
  }

 private:
  // bitsandbytes ignores quant_map when it dequantizes NF4 (the kernels have the table built in), so
  // a different table means the file is not what it claims to be.
  void check_quant_map() const {
    const std::string name = w_ + ".quant_map";
    const auto map = read<float>(name, DType::F32, {16});
    for (size_t k = 0; k < 16; ++k)
      if (std::memcmp(&map[k], &kCodes[k], sizeof(float)) != 0)
        throw Error(fmt::format("{}: tensor '{}': entry {} is {} where the NF4 table has {}", get(name).first->path(),
                                name, k, map[k], kCodes[k]));
  }

  const TensorLookup& find_;
  std::string w_;
};

}  // namespace

QuantizedTensor read_nf4(const TensorLookup& find, const std::string& weight_name) {
  return Nf4Reader(find, weight_name).read_all();
}

QuantizedTensor read_nf4(const SafetensorsFile& f, const std::string& weight_name) {
  const TensorLookup find = [&f](const std::string& name) { return f.contains(name) ? &f : nullptr; };
  return read_nf4(find, weight_name);
}

}  // namespace moelab::nf4
