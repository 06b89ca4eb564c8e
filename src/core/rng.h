// Counter-based random numbers: every draw is a pure function of (seed, stream, counter), so any
// position of a run can be reproduced without replaying the ones before it (resume, ranks).
#pragma once
#include <cmath>
#include <cstdint>

namespace dmat {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline uint64_t hash64(uint64_t a, uint64_t b) { return splitmix64(splitmix64(a) ^ (b + 0x632BE59BD9B4E019ull)); }
inline uint64_t hash64(uint64_t a, uint64_t b, uint64_t c) { return hash64(hash64(a, b), c); }

// Sequential generator with explicit state (one uint64), for loops that draw many numbers.
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t next() { return splitmix64(state++); }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }
  // Standard normal (Box–Muller, one value per call).
  double normal() {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  uint64_t below(uint64_t n) { return n ? next() % n : 0; }
};

}  // namespace dmat
