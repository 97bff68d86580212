//! The place for aarch64 kernel sets: `neon.rs` implements `Lanes` for 4 f32 lanes
//! (`float32x4_t`, masks as `uint32x4_t`, `vfmaq_f32` for the FMAs; NEON's `vmaxq_f32`
//! propagates NaN, so `max` needs `vmaxnmq_f32` plus the operand order the trait asks for),
//! then `kernel_set!(Neon, L4, "neon", Level::Neon)`, a `Level::Neon` and its detection in
//! `arch::detected`. Until then aarch64 runs the scalar set.
