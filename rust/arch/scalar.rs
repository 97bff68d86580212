//! Portable reference kernels, generic over f32 / f64, using the platform's libm.

use crate::arch::{GradParams, Kernels, Level};
use crate::float::Float;

#[derive(Clone, Copy)]
pub struct Scalar;

/// Four independent f64 partial sums: no serial dependency on one add, and terms
/// near the type's maximum do not overflow.
#[inline(always)]
fn sum4<F: Float>(buf: &[F], f: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; 4];
    let n4 = buf.len() / 4 * 4;
    let mut i = 0;
    while i < n4 {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += f(i + k);
        }
        i += 4;
    }
    let mut total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for j in n4..buf.len() {
        total += f(j);
    }
    total
}

impl<F: Float> Kernels<F> for Scalar {
    fn level(self) -> Level {
        Level::Scalar
    }

    fn transform(self, buf: &mut [F], scale: F, softcap: F, mut chain: Option<&mut [F]>) {
        if softcap > F::ZERO {
            for (i, x) in buf.iter_mut().enumerate() {
                let (v, dt) = softcap_scalar(scale * *x, softcap);
                *x = v;
                if let Some(ch) = chain.as_deref_mut() {
                    ch[i] = scale * dt;
                }
            }
        } else {
            for x in buf.iter_mut() {
                *x = scale * *x;
            }
        }
    }

    fn max_nan(self, buf: &[F]) -> (F, bool) {
        let mut m = F::NEG_INF;
        let mut nan = false;
        for &x in buf {
            if x > m {
                m = x;
            }
            nan |= x.is_nan();
        }
        (m, nan)
    }

    fn sum_exp(self, buf: &[F], m: F) -> f64 {
        sum4(buf, |i| (buf[i] - m).exp().to_f64())
    }

    fn sum(self, buf: &[F]) -> f64 {
        sum4(buf, |i| buf[i].to_f64())
    }

    // The differences in f64: 3e38 - (-3e38) overflows f32.
    fn dot_shift(self, x: &[F], w: Option<&[F]>, m: F) -> f64 {
        let m = m.to_f64();
        match w {
            Some(w) => sum4(x, |i| w[i].to_f64() * (x[i].to_f64() - m)),
            None => sum4(x, |i| x[i].to_f64() - m),
        }
    }

    fn grad(
        self,
        buf: &mut [F],
        p: &GradParams<F>,
        w: Option<&[F]>,
        t: Option<&[F]>,
        chain: Option<&[F]>,
    ) {
        for (i, x) in buf.iter_mut().enumerate() {
            let wi = w.map_or(F::ONE, |w| w[i]);
            let ti = t.map_or(F::ZERO, |t| t[i]);
            let ch = chain.map_or(p.scale, |c| c[i]);
            let prob = (*x - p.m).exp();
            *x = p.g * ch * (p.a * prob - p.d * wi - p.e * wi * ti);
        }
    }
}

/// (c * tanh(x / c), 1 - tanh^2), the latter as 4e/(1+e)^2 with e = exp(-2|x/c|):
/// exact where tanh saturates and 1 - tanh^2 would cancel.
pub fn softcap_scalar<F: Float>(x: F, c: F) -> (F, F) {
    let u = x / c;
    let a = if u < F::ZERO { F::ZERO - u } else { u };
    let e = (F::ZERO - (a + a)).exp();
    let q = F::ONE / (F::ONE + e);
    let four = F::from_f64(4.0);
    (c * u.tanh(), four * e * q * q)
}
