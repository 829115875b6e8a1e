// Runtime dtypes, the 16-bit float storage types, and dispatch_dtype: runtime outside, templates inside.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "core/error.h"

namespace ftune {

// f64 exists for gradient checks and reference math; models run in f32 (CPU) or bf16 (GPU).
enum class DType : uint8_t { f32, f64, bf16, f16, i32, i64, b8 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
DType dtype_from_name(const std::string& s);  // "f32"/"float32", "bf16"/"bfloat16", ...
inline bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16 || t == DType::f16;
}

// bfloat16 storage: the top 16 bits of an IEEE float, rounded to nearest even.
struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  bf16(float f) : bits(from_float(f)) {}  // NOLINT: implicit like a number
  operator float() const {                 // NOLINT
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
};

// IEEE binary16 storage with round-to-nearest-even conversion.
struct f16 {
  uint16_t bits = 0;
  f16() = default;
  f16(float f) : bits(from_float(f)) {}  // NOLINT
  operator float() const { return to_float(bits); }  // NOLINT
  static uint16_t from_float(float f);
  static float to_float(uint16_t h);
};

template <class T>
struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::f64; };
template <> struct dtype_of<bf16> { static constexpr DType value = DType::bf16; };
template <> struct dtype_of<f16> { static constexpr DType value = DType::f16; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::i32; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::i64; };
template <> struct dtype_of<bool> { static constexpr DType value = DType::b8; };

// Calls fn.template operator()<T>() for the C++ type of dtype t. Unsupported dtypes throw naming op.
// Compute kernels on the CPU run in f32 (and f64 for gradient checks): dispatch_float.
template <class F>
decltype(auto) dispatch_float(DType t, const char* op, F&& fn) {
  switch (t) {
    case DType::f32: return fn.template operator()<float>();
    case DType::f64: return fn.template operator()<double>();
    default: FTUNE_THROW("[", op, "] unsupported dtype ", dtype_name(t), " (CPU computes in f32 or f64)");
  }
}

template <class F>
decltype(auto) dispatch_dtype(DType t, const char* op, F&& fn) {
  switch (t) {
    case DType::f32: return fn.template operator()<float>();
    case DType::f64: return fn.template operator()<double>();
    case DType::bf16: return fn.template operator()<bf16>();
    case DType::f16: return fn.template operator()<f16>();
    case DType::i32: return fn.template operator()<int32_t>();
    case DType::i64: return fn.template operator()<int64_t>();
    case DType::b8: return fn.template operator()<bool>();
  }
  FTUNE_THROW("[", op, "] bad dtype");
}

}  // namespace ftune
