//! Every SIMD kernel set against the scalar reference, on the sets this CPU has; the
//! others are reported as skipped (with the reason) on stderr.

use super::generic::{Bf16, Stored, F16};
use super::lanes::{Lanes, MAX_LANES};
use super::scalar::Scalar;
use super::{GradParams, Kernels};
use crate::elem::{bf16_to_f32, f32_to_bf16, DType};

/// Runs `$body` with `$k` (a kernel set value) and `$L` (its lanes) for every x86 set.
macro_rules! each_set {
    (|$k:ident, $L:ident| $body:block) => {{
        #[cfg(target_arch = "x86_64")]
        {
            use crate::arch::x86_64::{avx2, avx512};
            match avx2::Avx2::new() {
                Some($k) => {
                    type $L = avx2::L8;
                    $body
                }
                None => eprintln!("skipped avx2: this CPU lacks AVX2, FMA or F16C"),
            }
            match avx512::Avx512::new() {
                Some($k) => {
                    type $L = avx512::L16;
                    $body
                }
                None => eprintln!("skipped avx512: this CPU lacks AVX-512 F, BW, VL or DQ"),
            }
        }
    }};
}

fn values() -> Vec<f32> {
    let mut v: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 2003) as f32 * 0.013 - 13.0)
        .collect();
    v.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0 + f32::EPSILON * 64.0, // a bf16 tie
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x7f7f_ffff),
        f32::from_bits(0x0000_0001),
        f32::from_bits(0x8000_8000),
    ]);
    v
}

/// Finite values of moderate size, `n` of them.
fn finite(n: usize) -> Vec<f32> {
    values()
        .into_iter()
        .filter(|v| v.is_finite() && v.abs() < 20.0)
        .cycle()
        .take(n)
        .collect()
}

const SIZES: [usize; 9] = [1, 7, 8, 15, 31, 32, 33, 100, 2048];

fn close(a: f64, b: f64, rel: f64) -> bool {
    a == b || (a - b).abs() <= rel * a.abs().max(b.abs())
}

/// Stores through the lanes round as the scalar conversions, NaN and ties included.
unsafe fn stores_round_as_scalar<L: Lanes>() {
    let src = values();
    for chunk in src.chunks(L::N) {
        let mut lanes = [0.0f32; MAX_LANES];
        lanes[..chunk.len()].copy_from_slice(chunk);
        let v = L::load(lanes.as_ptr());
        let (mut b, mut h) = ([0u16; MAX_LANES], [0u16; MAX_LANES]);
        L::store_bf16(b.as_mut_ptr(), v);
        L::store_f16(h.as_mut_ptr(), v);
        for (j, &x) in chunk.iter().enumerate() {
            assert_eq!(b[j], f32_to_bf16(x), "bf16 of {x:e}");
            assert_eq!(h[j], half::f16::from_f32(x).to_bits(), "f16 of {x:e}");
        }
    }
}

/// Widening loads give the scalar conversions' bits.
unsafe fn loads_match_scalar<L: Lanes>() {
    let src = values();
    let bf: Vec<Bf16> = src.iter().map(|&x| Bf16::from_f32(x)).collect();
    let hf: Vec<F16> = src.iter().map(|&x| F16::from_f32(x)).collect();
    let mut i = 0;
    while i + 2 * L::N <= src.len() {
        let (mut a, mut b) = ([0.0f32; MAX_LANES], [0.0f32; MAX_LANES]);
        L::store(a.as_mut_ptr(), Bf16::load::<L>(bf.as_ptr().add(i)));
        L::store(b.as_mut_ptr(), F16::load::<L>(hf.as_ptr().add(i)));
        for j in 0..L::N {
            assert_eq!(a[j].to_bits(), bf[i + j].to_f32().to_bits());
            assert_eq!(b[j].to_bits(), hf[i + j].to_f32().to_bits());
        }
        // The pair load: the same 2N values, in some order.
        let (p, q) = Bf16::load2::<L>(bf.as_ptr().add(i));
        let mut two = [0.0f32; 2 * MAX_LANES];
        L::store(two.as_mut_ptr(), p);
        L::store(two.as_mut_ptr().add(L::N), q);
        let mut got: Vec<u32> = two[..2 * L::N].iter().map(|x| x.to_bits()).collect();
        let mut want: Vec<u32> = bf[i..i + 2 * L::N]
            .iter()
            .map(|b| bf16_to_f32(b.0).to_bits())
            .collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        i += 2 * L::N;
    }
}

/// The pair store rounds as the scalar conversion (NaN payloads included) and puts the
/// pair load's two vectors back in element order.
unsafe fn pair_stores_invert_pair_loads<L: Lanes>() {
    let mut src = values();
    // NaNs whose rounding would carry out of the high half or leave it signalling.
    src.extend(
        [
            0x7f80_0001u32,
            0x7fff_ffff,
            0xffff_ffff,
            0xff80_0001,
            0x7fc0_ffff,
            0x7fff_8000,
        ]
        .map(f32::from_bits),
    );
    for chunk in src.chunks(2 * L::N) {
        let (mut e, mut o) = ([0.0f32; MAX_LANES], [0.0f32; MAX_LANES]);
        for (j, &x) in chunk.iter().enumerate() {
            if j % 2 == 0 {
                e[j / 2] = x;
            } else {
                o[j / 2] = x;
            }
        }
        let mut out = [0u16; 2 * MAX_LANES];
        L::store_bf16_2(out.as_mut_ptr(), L::load(e.as_ptr()), L::load(o.as_ptr()));
        for (j, &x) in chunk.iter().enumerate() {
            assert_eq!(out[j], f32_to_bf16(x), "bf16 of {:#x}", x.to_bits());
        }
    }
    let bits: Vec<u16> = src.iter().map(|&x| f32_to_bf16(x)).collect();
    for chunk in bits.chunks_exact(2 * L::N) {
        let (a, b) = L::load_bf16_2(chunk.as_ptr());
        let mut out = [0u16; 2 * MAX_LANES];
        L::store_bf16_2(out.as_mut_ptr(), a, b);
        assert_eq!(&out[..2 * L::N], chunk);
    }
}

#[test]
fn conversions_match_the_scalar_ones() {
    each_set!(|_k, L| {
        // SAFETY: the set's value exists, so the CPU has its features; the arrays hold
        // MAX_LANES >= N elements (2 * MAX_LANES for pairs) and the loads stay inside
        // `values()`.
        unsafe {
            stores_round_as_scalar::<L>();
            loads_match_scalar::<L>();
            pair_stores_invert_pair_loads::<L>();
        }
    });
}

fn check_reductions<K: Kernels<f32>>(k: K) {
    for n in SIZES {
        let x = finite(n);
        let m = 3.0f32;
        let name = k.level().name();
        assert_eq!(
            k.max_nan(&x),
            Kernels::<f32>::max_nan(Scalar, &x),
            "{name} n={n}"
        );
        let mut with_nan = x.clone();
        with_nan[n / 2] = f32::NAN;
        assert!(k.max_nan(&with_nan).1);
        let (a, b) = (k.sum_exp(&x, m), Kernels::<f32>::sum_exp(Scalar, &x, m));
        assert!(close(a, b, 2e-6), "{name} sum_exp n={n}: {a} vs {b}");
        // The large-|max| route (m * log2e rounds too coarsely for the one-pass sum).
        let big: Vec<f32> = x.iter().map(|v| v + 3e8).collect();
        let (a, b) = (
            k.sum_exp(&big, 3e8),
            Kernels::<f32>::sum_exp(Scalar, &big, 3e8),
        );
        assert!(
            close(a, b, 2e-6),
            "{name} sum_exp |m|=3e8 n={n}: {a} vs {b}"
        );
        let (s, cm) = k.sum_exp_max(&x, m).unwrap();
        assert_eq!(cm, Kernels::<f32>::max_nan(Scalar, &x).0);
        let b = Kernels::<f32>::sum_exp(Scalar, &x, m);
        assert!(close(s, b, 2e-6), "{name} sum_exp_max n={n}: {s} vs {b}");
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 3) as f32).collect();
        for wo in [None, Some(&w[..])] {
            let (a, b) = (
                k.dot_shift(&x, wo, m),
                Kernels::<f32>::dot_shift(Scalar, &x, wo, m),
            );
            assert!(close(a, b, 1e-12), "{name} dot_shift n={n}: {a} vs {b}");
        }
        let (a, b) = (k.sum(&x), Kernels::<f32>::sum(Scalar, &x));
        assert!(close(a, b, 1e-12), "{name} sum n={n}");
        // KL chunk: maxima exact, sums to rounding.
        let o: Vec<f32> = x.iter().rev().copied().collect();
        let f = k.kl_chunk(&x, &o, 0.5, 2.0, 1.0);
        let g = Kernels::<f32>::kl_chunk(Scalar, &x, &o, 0.5, 2.0, 1.0);
        assert_eq!((f.maxr, f.maxo, f.nan), (g.maxr, g.maxo, g.nan));
        assert!(
            close(f.sr, g.sr, 2e-6) && close(f.so, g.so, 2e-6),
            "{name} kl n={n}"
        );
        assert!(
            (f.x - g.x).abs() <= 1e-5 * g.sr.max(1.0) * 40.0,
            "{name} kl x n={n}"
        );
    }
}

fn check_elementwise<K: Kernels<f32>>(k: K) {
    let name = k.level().name();
    for n in SIZES {
        let x = finite(n);
        // Softcap transform and its chain factor.
        let (mut a, mut b) = (x.clone(), x.clone());
        let (mut ca, mut cb) = (vec![0.0f32; n], vec![0.0f32; n]);
        k.transform(&mut a, 1.5, 7.0, Some(&mut ca));
        Kernels::<f32>::transform(Scalar, &mut b, 1.5, 7.0, Some(&mut cb));
        for i in 0..n {
            assert!(
                close(a[i] as f64, b[i] as f64, 1e-5),
                "{name} softcap {} vs {}",
                a[i],
                b[i]
            );
            assert!(close(ca[i] as f64, cb[i] as f64, 1e-5), "{name} chain");
        }
        // The gradient with weights, soft targets and chain factors, to a few ulp of its terms.
        let p = GradParams {
            m: 5.0,
            a: 0.7,
            g: 0.25,
            d: 0.01,
            e: 0.3,
            scale: 1.0,
        };
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 3) as f32).collect();
        let t: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.1).collect();
        for (wo, to, cho) in [
            (None, None, None),
            (Some(&w[..]), None, None),
            (Some(&w[..]), Some(&t[..]), Some(&cb[..])),
        ] {
            let (mut a, mut b) = (x.clone(), x.clone());
            k.grad(&mut a, &p, wo, to, cho);
            Kernels::<f32>::grad(Scalar, &mut b, &p, wo, to, cho);
            for i in 0..n {
                let wi = wo.map_or(1.0, |w| w[i]) as f64;
                let size = 0.25 * (0.7 * (x[i] as f64 - 5.0).exp() + wi * (0.01 + 0.3));
                assert!(
                    ((a[i] - b[i]) as f64).abs() <= 2e-6 * size * 4.0,
                    "{name} grad n={n}"
                );
            }
        }
    }
}

/// The in-register half paths give exactly what converting into an f32 buffer first gives.
fn check_half_routes<K: Kernels<f32>>(k: K) {
    for n in SIZES {
        let x = finite(n);
        let bf: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
        let wide: Vec<f32> = bf.iter().map(|&b| bf16_to_f32(b)).collect();
        let m = 3.0f32;
        // The same terms, summed in other lanes: equal maxima, sums to rounding.
        let (a, am) = k.sum_exp_max_half(&bf, true, m).unwrap();
        let (b, bm) = k.sum_exp_max(&wide, m).unwrap();
        assert_eq!(am, bm);
        assert!((a - b).abs() <= 1e-6 * b, "{a} vs {b}");
        let hf: Vec<u16> = wide
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        let hw: Vec<f32> = hf
            .iter()
            .map(|&h| half::f16::from_bits(h).to_f32())
            .collect();
        assert_eq!(k.sum_exp_max_half(&hf, false, m), k.sum_exp_max(&hw, m));
        let p = GradParams {
            m: 5.0,
            a: 0.7,
            g: 0.25,
            d: 0.01,
            e: 0.0,
            scale: 1.0,
        };
        let mut buf = wide.clone();
        k.grad(&mut buf, &p, None, None, None);
        let want: Vec<u16> = buf.iter().map(|&v| f32_to_bf16(v)).collect();
        let mut got = bf.clone();
        // SAFETY: n bf16 elements, read and written in place (the same memory).
        let done = unsafe {
            k.grad_stored(
                DType::BF16,
                got.as_ptr() as *const u8,
                got.as_mut_ptr() as *mut u8,
                n,
                &p,
            )
        };
        assert!(done);
        assert_eq!(got, want, "n = {n}");
        // f16 through the set's buffer conversions, both ways.
        let mut back = vec![0.0f32; n];
        super::f16_to_f32(k.level(), &hf, &mut back);
        assert_eq!(back, hw);
        let mut h2 = vec![0u16; n];
        super::f32_to_f16(k.level(), &x, &mut h2);
        let want: Vec<u16> = x
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        assert_eq!(h2, want);
    }
}

#[test]
fn reductions_match_the_scalar_set() {
    each_set!(|k, _L| { check_reductions(k) });
}

#[test]
fn elementwise_kernels_match_the_scalar_set() {
    each_set!(|k, _L| { check_elementwise(k) });
}

#[test]
fn half_kernels_equal_the_buffer_route() {
    each_set!(|k, _L| { check_half_routes(k) });
}

fn check_binary<K: Kernels<f32>>(k: K) {
    use crate::engine::binary::{scalar_chunk, Chunk, Kind};
    let name = k.level().name();
    for n in SIZES {
        let x: Vec<f32> = finite(n).iter().map(|v| v * 0.7).collect();
        let t: Vec<f32> = (0..n).map(|i| (i % 7) as f32 / 6.0).collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 3) as f32).collect();
        let kinds = [
            Kind::Bce,
            Kind::Focal {
                alpha: 0.25,
                gamma: 2.0,
            },
            Kind::Focal {
                alpha: -1.0,
                gamma: 1.5,
            },
        ];
        for kind in kinds {
            for (wo, pwo) in [(None, None), (Some(&w[..]), Some(&w[..]))] {
                let c = Chunk {
                    x: &x,
                    t: &t,
                    w: wo,
                    pw: pwo,
                    gout: None,
                    gscale: 0.5,
                };
                let (mut la, mut ga) = (vec![0.0f32; n], vec![0.0f32; n]);
                let (mut lb, mut gb) = (vec![0.0f32; n], vec![0.0f32; n]);
                let sa = k.binary_chunk(kind, &c, &mut la, Some(&mut ga)).unwrap();
                scalar_chunk(kind, &c, &mut lb, Some(&mut gb));
                let sb: f64 = lb.iter().map(|&v| v as f64).sum();
                assert!(close(sa, sb, 1e-5), "{name} {kind:?} n={n}: {sa} vs {sb}");
                for i in 0..n {
                    let tol = 1e-5 * (1.0 + lb[i].abs()) as f64;
                    assert!(
                        ((la[i] - lb[i]) as f64).abs() <= tol,
                        "{name} {kind:?} loss"
                    );
                    let tol = 1e-5 * (1.0 + gb[i].abs()) as f64;
                    assert!(
                        ((ga[i] - gb[i]) as f64).abs() <= tol,
                        "{name} {kind:?} grad"
                    );
                }
            }
        }
    }
}

#[test]
fn binary_chunks_match_the_scalar_chunk() {
    each_set!(|k, _L| { check_binary(k) });
}
