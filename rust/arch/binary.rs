//! The elementwise binary losses' chunk (`engine::binary`), written once over the lane
//! trait: exp by a Cephes-style polynomial with the exponent added into the bits,
//! log1p(e) as log(1 + e) plus the rounding error of 1 + e divided by 1 + e. Inlined into
//! each kernel set's `#[target_feature]` entry point, as the kernels of `generic.rs`.

use super::lanes::{Lanes, MAX_LANES};
use crate::engine::binary::{focal_pow, scalar_chunk, Chunk, Kind};

/// exp(a) for a <= 0: 0 below -87.3 (so -inf gives 0); NaN lanes give garbage that
/// the callers replace.
#[allow(clippy::excessive_precision)]
#[inline(always)]
unsafe fn exp_le0<L: Lanes>(a: L::V) -> L::V {
    let lo = L::splat(-87.3);
    let keep = L::ge(a, lo);
    let x = L::max(a, lo);
    let fx = L::round(L::mul(x, L::splat(std::f32::consts::LOG2_E)));
    // x - n ln 2 in two parts, exact for |n| <= 126.
    let r = L::fnmadd(fx, L::splat(0.693_359_4), x);
    let r = L::fnmadd(fx, L::splat(-2.121_944_4e-4), r);
    let mut y = L::splat(1.987_569_1e-4);
    y = L::fmadd(y, r, L::splat(1.398_199_9e-3));
    y = L::fmadd(y, r, L::splat(8.333_452e-3));
    y = L::fmadd(y, r, L::splat(4.166_579_6e-2));
    y = L::fmadd(y, r, L::splat(1.666_666_5e-1));
    y = L::fmadd(y, r, L::splat(5.000_000_1e-1));
    y = L::fmadd(y, L::mul(r, r), L::add(r, L::splat(1.0)));
    L::and_mask(L::ldexp_add(y, fx), keep)
}

/// ln(u) for 1 <= u <= 2 (Cephes logf's reduction and polynomial).
#[allow(clippy::excessive_precision)]
#[inline(always)]
unsafe fn ln_1_2<L: Lanes>(u: L::V) -> L::V {
    let big = L::gt(u, L::splat(std::f32::consts::SQRT_2));
    let k = L::and_mask(L::splat(1.0), big);
    let m = L::blend(u, L::mul(u, L::splat(0.5)), big);
    let f = L::sub(m, L::splat(1.0));
    let z = L::mul(f, f);
    let mut y = L::splat(7.037_683_6e-2);
    for c in [
        -1.151_461_0e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_5e-1,
        -2.499_999_4e-1,
        3.333_333_1e-1,
    ] {
        y = L::fmadd(y, f, L::splat(c));
    }
    y = L::mul(L::mul(y, f), z);
    y = L::fmadd(k, L::splat(-2.121_944_4e-4), y);
    y = L::fnmadd(z, L::splat(0.5), y);
    let r = L::add(f, y);
    L::fmadd(k, L::splat(0.693_359_4), r)
}

/// m^gamma and gamma m^(gamma-1) lane by lane, as the scalar kernels compute them.
#[inline(always)]
unsafe fn pow_lanes<L: Lanes>(m: L::V, gamma: f64) -> (L::V, L::V) {
    let mut a = [0f32; MAX_LANES];
    L::store(a.as_mut_ptr(), m);
    let (mut p, mut d) = ([0f32; MAX_LANES], [0f32; MAX_LANES]);
    for i in 0..L::N {
        (p[i], d[i]) = focal_pow(a[i], gamma as f32, gamma);
    }
    (L::load(p.as_ptr()), L::load(d.as_ptr()))
}

#[inline(always)]
unsafe fn ld<L: Lanes>(s: &[f32], i: usize) -> L::V {
    let a = &s[i..i + L::N];
    L::load(a.as_ptr())
}

#[inline(always)]
unsafe fn st<L: Lanes>(s: &mut [f32], i: usize, v: L::V) {
    let a = &mut s[i..i + L::N];
    L::store(a.as_mut_ptr(), v)
}

/// The sum of `h`'s values, adjacent pairs first (for four: (h0 + h1) + (h2 + h3)).
fn pairwise(h: &[f64]) -> f64 {
    if h.len() == 1 {
        return h[0];
    }
    let (a, b) = h.split_at(h.len() / 2);
    pairwise(a) + pairwise(b)
}

/// As `engine::binary::scalar_chunk`, and the sum of the losses in f64.
#[inline(always)]
pub unsafe fn chunk<L: Lanes>(
    kind: Kind,
    c: &Chunk<f32>,
    loss: &mut [f32],
    grad: Option<&mut [f32]>,
) -> f64 {
    let n = c.x.len();
    let body = n - n % L::N;
    let one = L::splat(1.0);
    let zero = L::splat(0.0);
    let sign = L::splat(-0.0);
    let (alpha, gamma) = match kind {
        Kind::Bce => (-1.0, 0.0),
        Kind::Focal { alpha, gamma } => (alpha, gamma),
    };
    let fa = L::splat(alpha as f32);
    let fg = L::splat(gamma as f32);
    let gs = L::splat(c.gscale);
    let mut grad = grad;
    let (mut acc0, mut acc1) = (L::splat_d(0.0), L::splat_d(0.0));
    let mut i = 0;
    while i < body {
        let x = ld::<L>(c.x, i);
        let t = ld::<L>(c.t, i);
        let ax = L::abs(x);
        // -|x|: the sign bit set on |x|.
        let e = exp_le0::<L>(L::or_sign(ax, sign));
        let u = L::add(one, e);
        let r = L::div(one, u);
        // log1p(e) = ln(u) + (e - (u - 1)) / u: the rounding of 1 + e put back.
        let sp = L::fmadd(L::sub(e, L::sub(u, one)), r, ln_1_2::<L>(u));
        let pos = L::ge(x, zero);
        let er = L::mul(e, r);
        let p = L::blend(er, r, pos);
        let q = L::blend(r, er, pos);
        let min0 = L::min(x, zero);
        let omt = L::sub(one, t);
        // (1 - t) x - lw min(x, 0) first: it cancels exactly where the loss is only sp.
        let (l, d) = match kind {
            Kind::Bce => {
                let (mut l, mut d) = match c.pw {
                    None => (L::add(L::fmsub(omt, x, min0), sp), L::sub(p, t)),
                    Some(pw) => {
                        let pw = ld::<L>(pw, i);
                        let lw = L::fmadd(L::sub(pw, one), t, one);
                        let a = L::fnmadd(lw, min0, L::mul(omt, x));
                        (L::fmadd(lw, sp, a), L::fmsub(lw, p, L::mul(pw, t)))
                    }
                };
                if let Some(w) = c.w {
                    let w = ld::<L>(w, i);
                    l = L::mul(l, w);
                    d = L::mul(d, w);
                }
                (l, d)
            }
            Kind::Focal { .. } => {
                let ce = L::add(L::fmsub(omt, x, min0), sp);
                let m = L::fmadd(t, q, L::mul(omt, p));
                let (mg, dmg) = if gamma == 2.0 {
                    (L::mul(m, m), L::mul(fg, m))
                } else if gamma == 1.0 {
                    (m, one)
                } else if gamma == 0.0 {
                    (one, zero)
                } else {
                    pow_lanes::<L>(m, gamma)
                };
                let at = if alpha >= 0.0 {
                    L::fmadd(fa, t, L::mul(L::sub(one, fa), omt))
                } else {
                    one
                };
                let dm = L::mul(L::mul(L::sub(omt, t), p), q);
                let l = L::mul(at, L::mul(ce, mg));
                let d = L::fmadd(L::sub(p, t), mg, L::mul(ce, L::mul(dmg, dm)));
                (l, L::mul(at, d))
            }
        };
        st::<L>(loss, i, l);
        acc0 = L::add_d(acc0, L::lo_d(l));
        acc1 = L::add_d(acc1, L::hi_d(l));
        if let Some(g) = grad.as_deref_mut() {
            let s = match c.gout {
                None => gs,
                Some(go) => L::mul(ld::<L>(go, i), gs),
            };
            let v = L::mul(d, s);
            // NaN logits give a NaN gradient, as autograd in float64 does.
            let v = L::blend(v, x, L::unord(x, x));
            st::<L>(g, i, v);
        }
        i += L::N;
    }
    let mut h = [0f64; MAX_LANES / 2];
    L::store_d(h.as_mut_ptr(), L::add_d(acc0, acc1));
    let mut sum = pairwise(&h[..L::N / 2]);
    if body < n {
        fn part(s: &[f32], a: usize, b: usize) -> &[f32] {
            &s[a..b]
        }
        let tail = |s| part(s, body, n);
        let ct = Chunk {
            x: tail(c.x),
            t: tail(c.t),
            w: c.w.map(tail),
            pw: c.pw.map(tail),
            gout: c.gout.map(tail),
            gscale: c.gscale,
        };
        scalar_chunk(kind, &ct, &mut loss[body..n], grad.map(|g| &mut g[body..n]));
        sum += loss[body..n].iter().map(|&v| v as f64).sum::<f64>();
    }
    sum
}
