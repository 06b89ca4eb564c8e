// dmat_io: the safetensors reader/writer (format, validation, errors) and checkpoint folders
// (atomic commit, listing, pruning, replacement), plus the numpy reader reading our files.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "io/checkpoint_dir.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace dmat {
namespace {

namespace fs = std::filesystem;

using test::write_bytes;

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = char((n >> (8 * i)) & 0xff);
  return s;
}

// A file laid out by hand: length, header, data.
std::string hand_file(const std::string& header, const std::string& data) { return le64(header.size()) + header + data; }

std::string float_bytes(std::initializer_list<float> v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), std::data(v), s.size());
  return s;
}

// Expects constructing a SafetensorsFile on `bytes` to throw, with every string of `parts` in the message.
void expect_rejected(const std::string& tag, const std::string& bytes, std::vector<std::string> parts) {
  const std::string path = test::temp_dir("io_bad_" + tag) + "/bad.safetensors";
  write_bytes(path, bytes);
  parts.push_back(path);
  try {
    SafetensorsFile f(path);
    ADD_FAILURE() << tag << ": a corrupt file was accepted";
  } catch (const Error& e) {
    for (const auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << tag << ": '" << p
                                                                                           << "' not in: " << e.what();
  }
}

// ---- safetensors --------------------------------------------------------------------------------

TEST(IoSafetensors, RoundTripsSeveralDtypesAndShapes) {
  const std::string dir = test::temp_dir("io_roundtrip");
  std::vector<float> a(2 * 3 * 4 * 5);
  std::vector<double> b(7);
  std::vector<int32_t> c(3 * 2);
  std::vector<uint16_t> bf(4 * 3);  // bf16 bit patterns
  std::vector<uint16_t> u16(5);
  std::vector<uint32_t> u32(2 * 2);
  std::vector<float> one = {3.25f};
  test::random_fill(a, 11);
  test::random_fill(b, 12);
  for (size_t i = 0; i < c.size(); ++i) c[i] = int32_t(i) * 1000003 - 7;
  for (size_t i = 0; i < bf.size(); ++i) bf[i] = uint16_t(0x3f80 + 17 * i);
  for (size_t i = 0; i < u16.size(); ++i) u16[i] = uint16_t(65535 - i);
  for (size_t i = 0; i < u32.size(); ++i) u32[i] = uint32_t(4000000000u + i);

  auto T = [](void* p, Shape s, DType t) { return Tensor{p, s, t, Device::CPU}; };
  std::vector<NamedTensor> in = {
      {"model.a", T(a.data(), {2, 3, 4, 5}, DType::F32)}, {"b", T(b.data(), {7}, DType::F64)},
      {"c", T(c.data(), {3, 2}, DType::I32)},             {"bf", T(bf.data(), {4, 3}, DType::BF16)},
      {"u16", T(u16.data(), {5}, DType::U16)},            {"u32", T(u32.data(), {2, 2}, DType::U32)},
      {"scalar_like", T(one.data(), {1}, DType::F32)},    {"empty", T(nullptr, {0, 3}, DType::F32)},
  };
  const std::string path = dir + "/x.safetensors";
  write_safetensors(path, in, {{"format", "dmatrain"}, {"step", "12"}});
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  SafetensorsFile f(path);
  std::vector<std::string> want_names;
  for (const auto& nt : in) want_names.push_back(nt.name);
  EXPECT_EQ(f.names(), want_names);  // file order = writing order
  EXPECT_EQ(f.metadata().at("format"), "dmatrain");
  EXPECT_EQ(f.metadata().at("step"), "12");
  for (const auto& nt : in) {
    ASSERT_TRUE(f.has(nt.name)) << nt.name;
    const Tensor& t = f.get(nt.name);
    EXPECT_EQ(t.dtype, nt.tensor.dtype) << nt.name;
    EXPECT_TRUE(t.shape == nt.tensor.shape) << nt.name << " " << t.shape.str();
    EXPECT_EQ(t.device, Device::CPU);
    if (nt.tensor.bytes() > 0) EXPECT_EQ(std::memcmp(t.data, nt.tensor.data, t.bytes()), 0) << nt.name;
  }
  EXPECT_FLOAT_EQ(f.get("scalar_like").as<float>()[0], 3.25f);

  std::vector<float> back(a.size(), 0.f);
  f.copy_to("model.a", T(back.data(), {2, 3, 4, 5}, DType::F32));
  EXPECT_EQ(back, a);
  std::vector<double> bback(b.size());
  f.copy_to("b", T(bback.data(), {7}, DType::F64));
  EXPECT_EQ(bback, b);
}

// Found by UBSan (the sanitizer CI step) in RoundTripsSeveralDtypesAndShapes: tensors are packed
// back to back in the file, so an F32 after an odd number of BF16 elements was handed out as a
// misaligned view, and reading it as float is undefined behaviour. Every view is aligned now.
TEST(IoSafetensors, TensorViewsAreAlignedForTheirDtype) {
  const std::string dir = test::temp_dir("io_align");
  std::vector<uint16_t> h = {1, 2, 3};
  std::vector<float> f = {1.5f, -2.f};
  std::vector<double> d = {0.25};
  std::vector<NamedTensor> in = {{"h", Tensor{h.data(), {3}, DType::BF16, Device::CPU}},
                                 {"f", Tensor{f.data(), {2}, DType::F32, Device::CPU}},
                                 {"u", Tensor{h.data(), {1}, DType::U16, Device::CPU}},
                                 {"d", Tensor{d.data(), {1}, DType::F64, Device::CPU}}};
  write_safetensors(dir + "/a.safetensors", in);
  SafetensorsFile file(dir + "/a.safetensors");
  for (const auto& nt : in) {
    const Tensor& t = file.get(nt.name);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype), 0u) << nt.name;
    EXPECT_EQ(std::memcmp(t.data, nt.tensor.data, t.bytes()), 0) << nt.name;
  }
  EXPECT_EQ(file.get("f").as<float>()[1], -2.f);
  EXPECT_EQ(file.get("d").as<double>()[0], 0.25);
}

TEST(IoSafetensors, EmptyMetadataAndNoTensors) {
  const std::string dir = test::temp_dir("io_empty");
  std::vector<float> x = {1, 2};
  write_safetensors(dir + "/m.safetensors", {{"x", Tensor{x.data(), {2}, DType::F32, Device::CPU}}});
  SafetensorsFile f(dir + "/m.safetensors");
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(f.names(), std::vector<std::string>{"x"});
  // No "__metadata__" key at all when there is none.
  std::string raw = read_file(dir + "/m.safetensors");
  EXPECT_EQ(raw.find("__metadata__"), std::string::npos);

  write_safetensors(dir + "/none.safetensors", {});
  SafetensorsFile g(dir + "/none.safetensors");
  EXPECT_TRUE(g.names().empty());
  EXPECT_FALSE(g.has("x"));
}

TEST(IoSafetensors, WrittenBytesFollowTheFormat) {
  const std::string dir = test::temp_dir("io_format");
  std::vector<float> w = {1.5f, -2.0f, 0.25f};
  std::vector<int32_t> ids = {7, -1};
  write_safetensors(dir + "/f.safetensors",
                    {{"w", Tensor{w.data(), {3}, DType::F32, Device::CPU}},
                     {"ids", Tensor{ids.data(), {1, 2}, DType::I32, Device::CPU}}},
                    {{"k", "v"}});
  const std::string raw = read_file(dir + "/f.safetensors");
  ASSERT_GE(raw.size(), 8u);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(raw[i])) << (8 * i);
  EXPECT_EQ(n % 8, 0u) << "header must be padded to a multiple of 8";
  ASSERT_EQ(raw.size(), 8 + n + 12 + 8);
  const std::string header = raw.substr(8, n);
  EXPECT_EQ(header.find_first_not_of(' ', header.rfind('}') + 1), std::string::npos) << "pad with spaces only";
  auto j = nlohmann::json::parse(header);
  EXPECT_EQ(j["__metadata__"]["k"], "v");
  EXPECT_EQ(j["w"]["dtype"], "F32");
  EXPECT_EQ(j["w"]["shape"], nlohmann::json::array({3}));
  EXPECT_EQ(j["w"]["data_offsets"], nlohmann::json::array({0, 12}));
  EXPECT_EQ(j["ids"]["dtype"], "I32");
  EXPECT_EQ(j["ids"]["shape"], nlohmann::json::array({1, 2}));
  EXPECT_EQ(j["ids"]["data_offsets"], nlohmann::json::array({12, 20}));
  EXPECT_EQ(raw.substr(8 + n, 12), float_bytes({1.5f, -2.0f, 0.25f}));
  int32_t back[2];
  std::memcpy(back, raw.data() + 8 + n + 12, 8);
  EXPECT_EQ(back[0], 7);
  EXPECT_EQ(back[1], -1);
}

TEST(IoSafetensors, ReadsAHandWrittenFile) {
  // Data deliberately stored in the opposite order of the header entries, header unpadded
  // (other writers need not pad), metadata last.
  const std::string header =
      R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
      R"("a":{"dtype":"I32","shape":[2,1],"data_offsets":[0,8]},"__metadata__":{"who":"hand"}})";
  std::string data(8, '\0');
  int32_t a[2] = {-5, 42};
  std::memcpy(data.data(), a, 8);
  data += float_bytes({0.5f, 8.0f});
  const std::string path = test::temp_dir("io_hand") + "/h.safetensors";
  write_bytes(path, hand_file(header, data));
  SafetensorsFile f(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"b", "a"}));
  EXPECT_EQ(f.metadata().at("who"), "hand");
  const Tensor& ta = f.get("a");
  EXPECT_EQ(ta.dtype, DType::I32);
  EXPECT_TRUE(ta.shape == (Shape{2, 1}));
  EXPECT_EQ(ta.as<int32_t>()[0], -5);
  EXPECT_EQ(ta.as<int32_t>()[1], 42);
  const Tensor& tb = f.get("b");
  EXPECT_TRUE(tb.shape == (Shape{2}));
  EXPECT_EQ(tb.as<float>()[0], 0.5f);
  EXPECT_EQ(tb.as<float>()[1], 8.0f);
}

TEST(IoSafetensors, RejectsCorruptFilesWithClearErrors) {
  const std::string ok_header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string ok_data = float_bytes({1, 2});
  {  // sanity: the uncorrupted file is accepted
    const std::string path = test::temp_dir("io_bad_ok") + "/ok.safetensors";
    write_bytes(path, hand_file(ok_header, ok_data));
    EXPECT_NO_THROW(SafetensorsFile f(path));
  }
  expect_rejected("short", std::string("\x05\x00\x00", 3), {"at least"});
  const std::string full = hand_file(ok_header, ok_data);
  expect_rejected("truncated_data", full.substr(0, full.size() - 3), {"'w'", "past"});
  expect_rejected("truncated_header", full.substr(0, 20), {"header length"});
  expect_rejected("header_too_big", le64(1ull << 40) + ok_header + ok_data, {"header length", "exceeds"});
  expect_rejected("bad_json", hand_file(R"({"w":{"dtype":"F32",)", ok_data), {"JSON"});
  expect_rejected("not_object", hand_file("[1,2]", ""), {"object"});
  expect_rejected("offsets_out_of_range",
                  hand_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", ok_data),
                  {"'w'", "[4, 12]", "8 data bytes"});
  expect_rejected("offsets_reversed",
                  hand_file(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", ok_data), {"'w'", "begin"});
  expect_rejected("shape_size_mismatch",
                  hand_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", ok_data),
                  {"'w'", "[3]", "12 bytes"});
  expect_rejected("unknown_dtype", hand_file(R"({"w":{"dtype":"F8_E9","shape":[2],"data_offsets":[0,8]}})", ok_data),
                  {"'w'", "F8_E9"});
  expect_rejected("overlap",
                  hand_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                            R"("v":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                            ok_data),
                  {"overlap"});
  expect_rejected("trailing_bytes", hand_file(ok_header, ok_data + "xxxx"), {"size mismatch", "12"});
  expect_rejected("missing_field", hand_file(R"({"w":{"dtype":"F32","shape":[2]}})", ok_data), {"'w'", "data_offsets"});
  expect_rejected("negative_dim", hand_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", ok_data),
                  {"'w'", "non-negative"});
  expect_rejected("bad_metadata", hand_file(R"({"__metadata__":{"a":1}})", ""), {"__metadata__", "'a'"});
  // Found by fuzz_safetensors (tests/fuzz/corpus/safetensors/crash-empty-shape-overflow): an empty
  // tensor whose other entries multiply past INT64_MAX was accepted, and Shape::numel() overflowed
  // (undefined behaviour) on its way to 0.
  expect_rejected("empty_shape_overflow",
                  hand_file(R"({"a":{"dtype":"F32","shape":[1294967296249649,7296,0],"data_offsets":[0,0]}})", ""),
                  {"'a'", "[1294967296249649,7296,0]", "does not fit 64-bit sizes"});
}

TEST(IoSafetensors, MissingFileAndMissingTensor) {
  const std::string dir = test::temp_dir("io_missing");
  EXPECT_THROW(SafetensorsFile f(dir + "/nope.safetensors"), Error);
  std::vector<float> x = {1};
  write_safetensors(dir + "/a.safetensors", {{"x", Tensor{x.data(), {1}, DType::F32, Device::CPU}}});
  SafetensorsFile f(dir + "/a.safetensors");
  try {
    f.get("y");
    FAIL() << "missing tensor accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'y'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("a.safetensors"), std::string::npos) << e.what();
  }
}

// A directory where the file should be was once read as a file: uninitialised bytes, a different
// "header length" each run. Now it is an error saying what the path is.
TEST(IoSafetensors, ADirectoryIsNotAFile) {
  const std::string dir = test::temp_dir("io_dir_not_file");
  std::filesystem::create_directories(dir + "/model.safetensors");
  try {
    SafetensorsFile f(dir + "/model.safetensors");
    FAIL() << "a directory was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors: not a safetensors file: a directory"), std::string::npos)
        << e.what();
  }
  try {
    read_file(dir + "/model.safetensors");
    FAIL() << "a directory was read";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("a directory, expected a file"), std::string::npos) << e.what();
  }
}

TEST(IoSafetensors, CopyToChecksDtypeAndShape) {
  const std::string dir = test::temp_dir("io_copy");
  std::vector<float> x(6, 1.f);
  write_safetensors(dir + "/a.safetensors", {{"x", Tensor{x.data(), {2, 3}, DType::F32, Device::CPU}}});
  SafetensorsFile f(dir + "/a.safetensors");
  std::vector<float> dst(6, 0.f);
  try {
    f.copy_to("x", Tensor{dst.data(), {3, 2}, DType::F32, Device::CPU});
    FAIL() << "shape mismatch accepted";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("[2,3]"), std::string::npos) << m;
    EXPECT_NE(m.find("[3,2]"), std::string::npos) << m;
    EXPECT_NE(m.find("'x'"), std::string::npos) << m;
  }
  try {
    f.copy_to("x", Tensor{dst.data(), {6}, DType::F32, Device::CPU});  // same numel, other rank
    FAIL() << "rank mismatch accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[6]"), std::string::npos) << e.what();
  }
  std::vector<int32_t> idst(6);
  try {
    f.copy_to("x", Tensor{idst.data(), {2, 3}, DType::I32, Device::CPU});
    FAIL() << "dtype mismatch accepted";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("F32"), std::string::npos) << m;
    EXPECT_NE(m.find("I32"), std::string::npos) << m;
  }
  EXPECT_EQ(dst, std::vector<float>(6, 0.f)) << "a failed copy must not touch the destination";
}

TEST(IoSafetensors, DuplicateNamesAreAnError) {
  const std::string dir = test::temp_dir("io_dup");
  std::vector<float> x = {1};
  Tensor t{x.data(), {1}, DType::F32, Device::CPU};
  try {
    write_safetensors(dir + "/d.safetensors", {{"x", t}, {"x", t}});
    FAIL() << "duplicate accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'x'"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir + "/d.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/d.safetensors.tmp"));
}

TEST(IoSafetensors, RewriteReplacesAtomically) {
  const std::string dir = test::temp_dir("io_rewrite");
  std::vector<float> x = {1, 2}, y = {3, 4, 5};
  write_safetensors(dir + "/r.safetensors", {{"x", Tensor{x.data(), {2}, DType::F32, Device::CPU}}});
  write_safetensors(dir + "/r.safetensors", {{"y", Tensor{y.data(), {3}, DType::F32, Device::CPU}}});
  SafetensorsFile f(dir + "/r.safetensors");
  EXPECT_EQ(f.names(), std::vector<std::string>{"y"});
  EXPECT_EQ(f.get("y").as<float>()[2], 5.f);
}

// The numpy reader (tests/oracle/safetensors_np.py) reads what we write, value for value.
TEST(IoSafetensors, PythonReaderReadsOurFile) {
  const std::string py = "/usr/bin/python3";
  if (test::run(py + " -c 'import numpy'").rc != 0)
    GTEST_SKIP() << py << " cannot import numpy (install python3-numpy to run this check)";
  const std::string dir = test::temp_dir("io_python");
  std::vector<float> w = {1.5f, -2.0f, 0.25f, 1e-30f, 3.0e38f, -0.0f};
  std::vector<int32_t> ids = {7, -1, 2147483647, -2147483647 - 1};
  std::vector<double> d = {3.141592653589793};
  std::vector<uint16_t> bf = {0x3f80, 0xc000};  // bf16 1.0, -2.0
  write_safetensors(dir + "/p.safetensors",
                    {{"w", Tensor{w.data(), {2, 3}, DType::F32, Device::CPU}},
                     {"ids", Tensor{ids.data(), {4}, DType::I32, Device::CPU}},
                     {"d", Tensor{d.data(), {1}, DType::F64, Device::CPU}},
                     {"bf", Tensor{bf.data(), {2}, DType::BF16, Device::CPU}}},
                    {{"format", "dmatrain"}});
  const std::string script =
      "import sys; sys.path.insert(0, '" + test::source_dir() + "/tests/oracle')\n"
      "import numpy as np, safetensors_np as st\n"
      "t, meta = st.read('" + dir + "/p.safetensors')\n"
      "assert list(t) == ['w', 'ids', 'd', 'bf'], list(t)\n"
      "assert meta == {'format': 'dmatrain'}, meta\n"
      "assert t['w'].dtype == np.float32 and t['w'].shape == (2, 3)\n"
      "assert (t['w'].ravel() == np.array([1.5, -2.0, 0.25, 1e-30, 3.0e38, -0.0], np.float32)).all()\n"
      "assert t['ids'].dtype == np.int32 and t['ids'].tolist() == [7, -1, 2147483647, -2147483648]\n"
      "assert t['d'].dtype == np.float64 and t['d'].tolist() == [3.141592653589793]\n"
      "assert st.bf16_to_f32(t['bf']).tolist() == [1.0, -2.0]\n"
      "print('python reader ok')\n";
  write_file_atomic(dir + "/check.py", script);
  auto r = test::run(py + " " + dir + "/check.py");
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("python reader ok"), std::string::npos) << r.out;
}

// The model oracle (tests/oracle/torch_oracle.py) passes a correct float32 result and fails wrong ones.
TEST(IoOracle, TorchOracleSelfTest) {
  const std::string py = "/usr/bin/python3";
  if (test::run(py + " -c 'import numpy, torch'").rc != 0)
    GTEST_SKIP() << py << " cannot import numpy and torch (install python3-numpy python3-torch to run this check)";
  auto r = test::run(py + " " + test::source_dir() + "/tests/oracle/selftest.py");
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("\"selftest\": true, \"ok\": true"), std::string::npos) << r.out;
}

// ---- checkpoint folders -------------------------------------------------------------------------

std::string make_checkpoint(const std::string& run, int64_t step, const std::string& payload) {
  const std::string tmp = begin_checkpoint(run, step);
  EXPECT_TRUE(fs::path(tmp).filename().string().rfind(".tmp_step_", 0) == 0) << tmp;
  write_file_atomic(tmp + "/payload.txt", payload);
  return commit_checkpoint(run, tmp, step);
}

TEST(IoCheckpointDir, NameIsZeroPadded) {
  EXPECT_EQ(checkpoint_dir_name(200), "step_00000200");
  EXPECT_EQ(checkpoint_dir_name(0), "step_00000000");
  EXPECT_EQ(checkpoint_dir_name(123456789), "step_123456789");
  EXPECT_THROW(checkpoint_dir_name(-1), Error);
}

TEST(IoCheckpointDir, CommitMakesACompleteCheckpoint) {
  const std::string run = test::temp_dir("io_ckpt_commit");
  EXPECT_TRUE(list_checkpoints(run).empty());
  EXPECT_FALSE(latest_checkpoint(run).has_value());
  const std::string final_dir = make_checkpoint(run, 200, "two hundred");
  EXPECT_EQ(final_dir, run + "/checkpoints/step_00000200");
  EXPECT_TRUE(fs::is_regular_file(final_dir + "/COMPLETE"));
  EXPECT_EQ(read_file(final_dir + "/payload.txt"), "two hundred");
  EXPECT_FALSE(fs::exists(run + "/checkpoints/.tmp_step_00000200"));
  auto all = list_checkpoints(run);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].step, 200);
  EXPECT_EQ(all[0].path, final_dir);
  ASSERT_TRUE(latest_checkpoint(run).has_value());
  EXPECT_EQ(latest_checkpoint(run)->step, 200);
}

TEST(IoCheckpointDir, IncompleteFoldersAreIgnored) {
  const std::string run = test::temp_dir("io_ckpt_incomplete");
  make_checkpoint(run, 100, "a");
  // A crash mid-write: temp folder never committed.
  const std::string tmp = begin_checkpoint(run, 300);
  write_file_atomic(tmp + "/payload.txt", "half");
  // A step folder without COMPLETE (e.g. copied by hand), and folders with other names.
  fs::create_directories(run + "/checkpoints/step_00000400");
  fs::create_directories(run + "/checkpoints/step_500");
  write_file_atomic(run + "/checkpoints/step_500/COMPLETE", "");
  fs::create_directories(run + "/checkpoints/step_0000060x");
  write_file_atomic(run + "/checkpoints/step_0000060x/COMPLETE", "");
  write_file_atomic(run + "/checkpoints/step_00000700", "a file, not a folder");
  auto all = list_checkpoints(run);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].step, 100);
  EXPECT_EQ(latest_checkpoint(run)->step, 100);
  // Commit the half one: now it counts.
  commit_checkpoint(run, tmp, 300);
  EXPECT_EQ(latest_checkpoint(run)->step, 300);
}

TEST(IoCheckpointDir, PruneKeepsTheNewestK) {
  const std::string run = test::temp_dir("io_ckpt_prune");
  for (int64_t s : {50, 10, 40, 20, 30}) make_checkpoint(run, s, std::to_string(s));
  fs::create_directories(run + "/checkpoints/.tmp_step_00000060");  // stale temp folder
  fs::create_directories(run + "/checkpoints/step_00000070");       // incomplete: not counted, not removed
  auto all = list_checkpoints(run);
  ASSERT_EQ(all.size(), 5u);
  for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(all[i].step, int64_t(10 * (i + 1)));  // ascending
  prune_checkpoints(run, 0);  // keep all (but drop stale temp folders)
  EXPECT_EQ(list_checkpoints(run).size(), 5u);
  EXPECT_FALSE(fs::exists(run + "/checkpoints/.tmp_step_00000060"));
  prune_checkpoints(run, 2);
  all = list_checkpoints(run);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].step, 40);
  EXPECT_EQ(all[1].step, 50);
  EXPECT_FALSE(fs::exists(run + "/checkpoints/step_00000010"));
  EXPECT_TRUE(fs::exists(run + "/checkpoints/step_00000070"));
  prune_checkpoints(run, 5);  // more than exist: nothing removed
  EXPECT_EQ(list_checkpoints(run).size(), 2u);
  EXPECT_THROW(prune_checkpoints(run, -1), Error);
  prune_checkpoints(test::temp_dir("io_ckpt_prune_empty"), 3);  // no checkpoints folder: nothing to do
}

TEST(IoCheckpointDir, RecommitOfTheSameStepReplacesIt) {
  const std::string run = test::temp_dir("io_ckpt_recommit");
  const std::string first = make_checkpoint(run, 200, "old");
  write_file_atomic(first + "/only_in_old.txt", "x");
  const std::string second = make_checkpoint(run, 200, "new");
  EXPECT_EQ(first, second);
  EXPECT_EQ(read_file(second + "/payload.txt"), "new");
  EXPECT_FALSE(fs::exists(second + "/only_in_old.txt"));
  EXPECT_TRUE(fs::exists(second + "/COMPLETE"));
  auto all = list_checkpoints(run);
  ASSERT_EQ(all.size(), 1u);
  // Nothing left behind in the checkpoints folder but the one checkpoint.
  int entries = 0;
  for (const auto& e : fs::directory_iterator(run + "/checkpoints")) {
    ++entries;
    EXPECT_EQ(e.path().filename().string(), "step_00000200");
  }
  EXPECT_EQ(entries, 1);
}

TEST(IoCheckpointDir, BeginRemovesAStaleTempOfTheSameStep) {
  const std::string run = test::temp_dir("io_ckpt_begin");
  const std::string tmp = begin_checkpoint(run, 5);
  write_file_atomic(tmp + "/junk", "x");
  const std::string again = begin_checkpoint(run, 5);
  EXPECT_EQ(tmp, again);
  EXPECT_TRUE(fs::is_directory(again));
  EXPECT_FALSE(fs::exists(again + "/junk"));
  EXPECT_THROW(commit_checkpoint(run, run + "/checkpoints/.tmp_step_00000009", 9), Error);
}

TEST(IoFiles, WriteAtomicAndRead) {
  const std::string dir = test::temp_dir("io_files");
  write_file_atomic(dir + "/a.json", "{\"x\": 1}\n");
  EXPECT_EQ(read_file(dir + "/a.json"), "{\"x\": 1}\n");
  EXPECT_FALSE(fs::exists(dir + "/a.json.tmp"));
  write_file_atomic(dir + "/a.json", std::string("bin\0ary", 7));
  EXPECT_EQ(read_file(dir + "/a.json"), std::string("bin\0ary", 7));
  write_file_atomic(dir + "/empty", "");
  EXPECT_EQ(read_file(dir + "/empty"), "");
  try {
    read_file(dir + "/missing.json");
    FAIL() << "missing file read";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/missing.json"), std::string::npos) << e.what();
  }
  EXPECT_THROW(write_file_atomic(dir + "/no/such/folder/x", "y"), Error);
}

}  // namespace
}  // namespace dmat
