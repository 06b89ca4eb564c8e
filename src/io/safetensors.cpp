#include "io/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "io/atomic_write.h"

namespace dmat {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host would need byte swaps");

namespace {

using ojson = nlohmann::ordered_json;

// Larger headers are not weights files (Hugging Face's reader uses the same 100 MB cap).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

const char* st_dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::BF16: return "BF16";
    case DType::I32: return "I32";
    case DType::U16: return "U16";
    case DType::U32: return "U32";
  }
  return "?";
}

bool st_dtype_from_name(const std::string& s, DType* out) {
  for (DType t : {DType::F32, DType::F64, DType::BF16, DType::I32, DType::U16, DType::U32}) {
    if (s == st_dtype_name(t)) {
      *out = t;
      return true;
    }
  }
  return false;
}

std::string describe(const Tensor& t) { return fmt::format("{} {}", st_dtype_name(t.dtype), t.shape.str()); }

}  // namespace

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  ojson header = ojson::object();
  if (!metadata.empty()) {
    ojson meta = ojson::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = meta;
  }
  std::set<std::string> seen;
  uint64_t offset = 0;
  std::vector<io_detail::Span> parts;
  parts.reserve(tensors.size() + 2);
  for (const NamedTensor& nt : tensors) {
    const Tensor& t = nt.tensor;
    if (nt.name.empty() || nt.name == "__metadata__")
      fail("{}: invalid tensor name '{}' (names must be non-empty and not __metadata__)", path, nt.name);
    if (!seen.insert(nt.name).second) fail("{}: tensor '{}' given twice (names must be unique)", path, nt.name);
    if (t.device != Device::CPU)
      fail("{}: tensor '{}' is on {}; copy it to CPU memory before writing", path, nt.name, device_name(t.device));
    for (int i = 0; i < t.shape.n; ++i)
      if (t.shape[i] < 0) fail("{}: tensor '{}' has a negative dimension {}", path, nt.name, t.shape.str());
    if (t.bytes() > 0 && t.data == nullptr) fail("{}: tensor '{}' {} has no data", path, nt.name, describe(t));
    ojson shape = ojson::array();
    for (int i = 0; i < t.shape.n; ++i) shape.push_back(t.shape[i]);
    header[nt.name] = {{"dtype", st_dtype_name(t.dtype)},
                       {"shape", shape},
                       {"data_offsets", {offset, offset + t.bytes()}}};
    offset += t.bytes();
    if (t.bytes() > 0) parts.push_back({t.data, t.bytes()});
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  unsigned char len[8];
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
  parts.insert(parts.begin(), {{len, sizeof len}, {json.data(), json.size()}});
  io_detail::write_parts_atomic(path, parts);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  std::error_code ec;
  if (std::filesystem::exists(path, ec) && !std::filesystem::is_regular_file(path, ec))
    fail("{}: not a safetensors file: {} (expected a regular file)", path,
         std::filesystem::is_directory(path, ec) ? "a directory" : "not a regular file");
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) fail("{}: cannot open safetensors file", path);
  const uint64_t file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  if (file_size < 8)
    fail("{}: not a safetensors file: {} bytes, expected at least an 8-byte header length", path, file_size);
  unsigned char len[8];
  in.read(reinterpret_cast<char*>(len), 8);
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t(len[i]) << (8 * i);
  if (header_len > file_size - 8)
    fail("{}: corrupt safetensors file: header length {} exceeds the {} bytes after the length field "
         "(truncated file?)",
         path, header_len, file_size - 8);
  if (header_len > kMaxHeaderBytes)
    fail("{}: corrupt safetensors file: header length {} exceeds the {} byte limit", path, header_len,
         kMaxHeaderBytes);
  std::string header_text(header_len, '\0');
  in.read(header_text.data(), std::streamsize(header_len));
  if (!in) fail("{}: read error (file changed while reading?)", path);
  const uint64_t data_size = file_size - 8 - header_len;

  ojson header;
  try {
    header = ojson::parse(header_text);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: corrupt safetensors header: not valid JSON ({})", path, e.what());
  }
  if (!header.is_object()) fail("{}: corrupt safetensors header: expected a JSON object", path);

  struct Range {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Range> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const ojson& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) fail("{}: __metadata__ must be an object of strings", path);
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m.value().is_string())
          fail("{}: __metadata__ entry '{}' must be a string (got {})", path, m.key(), m.value().dump());
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& why) { fail("{}: tensor '{}': {} (entry {})", path, name, why, e.dump()); };
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
      bad("expected an object with dtype, shape and data_offsets");
    const ojson& jd = e["dtype"];
    const ojson& js = e["shape"];
    const ojson& jo = e["data_offsets"];
    if (!jd.is_string()) bad("dtype must be a string");
    Tensor t;
    if (!st_dtype_from_name(jd.get<std::string>(), &t.dtype))
      bad(fmt::format("unsupported dtype '{}' (expected F32, F64, BF16, I32, U16 or U32)", jd.get<std::string>()));
    if (!js.is_array()) bad("shape must be an array");
    if (js.size() > size_t(kMaxDims)) bad(fmt::format("{} dimensions, at most {} supported", js.size(), kMaxDims));
    // numel in uint64 (overflow noted); nonzero: the product of the nonzero entries, which must fit
    // int64 even when a zero entry makes the tensor empty (Shape::numel multiplies left to right).
    uint64_t numel = 1, nonzero = 1;
    bool overflow = false;
    for (const auto& d : js) {
      if (!d.is_number_unsigned()) bad("shape entries must be non-negative integers");
      const uint64_t v = d.get<uint64_t>();
      if (v > uint64_t(std::numeric_limits<int64_t>::max())) bad("shape entry too large");
      t.shape.d[t.shape.n++] = int64_t(v);
      if (v != 0 && numel > std::numeric_limits<uint64_t>::max() / v) overflow = true;
      numel *= v;
      if (v != 0) {
        if (nonzero > uint64_t(std::numeric_limits<int64_t>::max()) / v)
          bad(fmt::format("shape {}: the product of its entries does not fit 64-bit sizes", js.dump()));
        nonzero *= v;
      }
    }
    if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() || !jo[1].is_number_unsigned())
      bad("data_offsets must be [begin, end] with non-negative integers");
    const uint64_t begin = jo[0].get<uint64_t>(), end = jo[1].get<uint64_t>();
    if (begin > end) bad(fmt::format("data_offsets begin {} > end {}", begin, end));
    if (end > data_size)
      bad(fmt::format("data_offsets [{}, {}] run past the {} data bytes (truncated file?)", begin, end, data_size));
    const uint64_t esize = dtype_size(t.dtype);
    if (overflow || numel > std::numeric_limits<uint64_t>::max() / esize || numel * esize != end - begin)
      bad(fmt::format("shape {} of {} needs {} bytes but data_offsets [{}, {}] hold {}", t.shape.str(),
                      jd.get<std::string>(), overflow ? std::string("too many") : std::to_string(numel * esize),
                      begin, end, end - begin));
    t.device = Device::CPU;
    tensors_[name] = t;
    order_.push_back(name);
    ranges.push_back({begin, end, name});
  }
  // As Hugging Face's reader: tensors tile the data section exactly (no overlap, no gap, no tail).
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  uint64_t pos = 0;
  for (const Range& r : ranges) {
    if (r.begin < pos)
      fail("{}: tensor '{}': data_offsets [{}, {}] overlap the previous tensor (which ends at {})", path, r.name,
           r.begin, r.end, pos);
    if (r.begin > pos)
      fail("{}: tensor '{}': data_offsets [{}, {}] leave a gap of unused bytes [{}, {})", path, r.name, r.begin,
           r.end, pos, r.begin);
    pos = r.end;
  }
  if (pos != data_size)
    fail("{}: size mismatch: tensors cover {} data bytes but the file holds {} after the header", path, pos,
         data_size);

  // The data, each tensor at a multiple of 8 bytes of one buffer (new[] aligns it to 16): the file
  // packs tensors back to back, so an F32 after an odd number of BF16 elements would otherwise be a
  // misaligned view (reading it as float is undefined behaviour). Read in file order.
  std::vector<uint64_t> at(ranges.size());
  uint64_t total = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    at[i] = total;
    total += (ranges[i].end - ranges[i].begin + 7) / 8 * 8;
  }
  bytes_.assign(std::max<uint64_t>(total, 1), 0);
  for (size_t i = 0; i < ranges.size(); ++i) {
    const Range& r = ranges[i];
    in.seekg(std::streamoff(8 + header_len + r.begin));
    in.read(bytes_.data() + at[i], std::streamsize(r.end - r.begin));
    tensors_[r.name].data = bytes_.data() + at[i];
  }
  if (!in) fail("{}: read error (file changed while reading?)", path);
}

bool SafetensorsFile::has(const std::string& name) const { return tensors_.count(name) != 0; }

const Tensor& SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    std::string some;
    for (size_t i = 0; i < order_.size() && i < 8; ++i) some += (i ? ", " : "") + order_[i];
    if (order_.size() > 8) some += ", ...";
    fail("{}: no tensor named '{}' (the file holds {} tensors: {})", path_, name, order_.size(), some);
  }
  return it->second;
}

void SafetensorsFile::copy_to(const std::string& name, const Tensor& dst) const {
  const Tensor& src = get(name);
  if (src.dtype != dst.dtype || !(src.shape == dst.shape))
    fail("{}: tensor '{}' is {} but the destination expects {}", path_, name, describe(src), describe(dst));
  if (dst.device != Device::CPU)
    fail("{}: tensor '{}': destination is on {}; copy_to fills CPU memory", path_, name, device_name(dst.device));
  if (src.bytes() > 0) std::memcpy(dst.data, src.data, src.bytes());
}

std::vector<std::string> SafetensorsFile::names() const { return order_; }

}  // namespace dmat
