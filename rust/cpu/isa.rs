//! The instruction sets the CPU kernels are compiled for, which of them this CPU runs, and the one in use.
//!
//! Every vector kernel is one body generic over `FMA` (fused multiply-add or not) and `W` (f32 lanes per vector),
//! compiled three times by [`isa_dispatch!`](crate::isa_dispatch): for AVX-512 (F/BW/DQ/VL, `W = 16`), for
//! AVX2+FMA (`W = 8`) and for the baseline (`W = 8`, no FMA), and the GEMMs run the matching micro-kernels of the
//! `gemm` crate (`matmul`). The level in use is the best one the CPU has, unless `DIFATTN_CPU_ISA` (read once)
//! or [`set`] asks for a lower one; asking for one the CPU lacks is an error, never a silent downgrade, so a
//! benchmark labelled with an ISA ran it. `avx512bf16` is AVX-512 plus the bf16 dot products (`vdpbf16ps`) that
//! bf16 inputs use in the attention GEMMs.
//!
//! AMX tiles are not used: stable Rust has neither their intrinsics nor their `target_feature` (both unstable,
//! rust-lang/rust#126622), and code this machine cannot run is not shipped. The place for them is a level above
//! `Avx512Bf16` here and a GEMM in `matmul` beside the bf16 one.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// The environment variable that forces a lower level (`scalar`, `avx2`, `avx512` or `avx512bf16`).
pub const ENV: &str = "DIFATTN_CPU_ISA";

/// The instruction-set levels, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// The baseline of the target (SSE2 on x86-64), no FMA.
    Scalar,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F, BW, DQ and VL (x86-64-v4).
    Avx512,
    /// AVX-512 and its bf16 dot products.
    Avx512Bf16,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Scalar, Level::Avx2, Level::Avx512, Level::Avx512Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Avx512Bf16 => "avx512bf16",
        }
    }

    pub fn parse(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name.trim().to_ascii_lowercase())
    }

    /// The CPU features the level needs (as `is_x86_feature_detected!` names them).
    pub fn features(self) -> &'static [&'static str] {
        match self {
            Level::Scalar => &[],
            Level::Avx2 => &["avx2", "fma"],
            Level::Avx512 => &["avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"],
            Level::Avx512Bf16 => &["avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512bf16"],
        }
    }
}

/// Whether this CPU has `feature` (one of the names of [`Level::features`] or [`cpu_features`]).
fn has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "avx2" => std::is_x86_feature_detected!("avx2"),
            "fma" => std::is_x86_feature_detected!("fma"),
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::is_x86_feature_detected!("avx512bw"),
            "avx512dq" => std::is_x86_feature_detected!("avx512dq"),
            "avx512vl" => std::is_x86_feature_detected!("avx512vl"),
            "avx512bf16" => std::is_x86_feature_detected!("avx512bf16"),
            // Not detectable through std on stable Rust: CPUID leaf 7 (EDX bits 23, 22, 24), what the CPU reports
            // (the OS must still enable AMX's state for a process before use).
            "avx512fp16" => (cpuid7_edx() >> 23) & 1 == 1,
            "amx-bf16" => (cpuid7_edx() >> 22) & 1 == 1,
            "amx-tile" => (cpuid7_edx() >> 24) & 1 == 1,
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}

#[cfg(target_arch = "x86_64")]
fn cpuid7_edx() -> u32 {
    // CPUID leaf 7 exists on every CPU with AVX2, the only ones asked about AMX and FP16 here.
    if !std::is_x86_feature_detected!("avx2") {
        return 0;
    }
    // SAFETY: CPUID is available on every x86-64 CPU, and leaf 7 on those with AVX2 (checked above). (Rust
    // releases before the intrinsic became safe need the block.)
    #[allow(unused_unsafe)]
    unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx
}

/// The vector features of this CPU that matter to the kernels, used or not (AMX and AVX512-FP16 are reported, not
/// used).
pub fn cpu_features() -> Vec<&'static str> {
    const ALL: [&str; 10] =
        ["avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512bf16", "avx512fp16", "amx-tile", "amx-bf16"];
    ALL.into_iter().filter(|f| has(f)).collect()
}

/// A level this CPU runs. Only made after checking the CPU's features, so the kernels may run the code of its
/// level: [`isa_dispatch!`](crate::isa_dispatch) relies on that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Isa(Level);

impl Isa {
    /// The level.
    pub fn level(self) -> Level {
        self.0
    }

    /// f32 lanes per vector of the level's clones (the `W` that [`isa_dispatch!`](crate::isa_dispatch) gives).
    pub fn f32_lanes(self) -> usize {
        if self.0 >= Level::Avx512 {
            16
        } else {
            8
        }
    }

    /// The best level of this CPU (detected once).
    pub fn detected() -> Isa {
        static BEST: OnceLock<Level> = OnceLock::new();
        Isa(*BEST.get_or_init(|| {
            Level::ALL.into_iter().filter(|l| l.features().iter().all(|f| has(f))).max().unwrap_or(Level::Scalar)
        }))
    }

    /// Every level this CPU runs, lowest first.
    pub fn supported() -> Vec<Isa> {
        Level::ALL.into_iter().filter(|&l| l <= Isa::detected().0).map(Isa).collect()
    }

    /// `level`, when this CPU runs it; otherwise an error naming the missing features.
    pub fn new(level: Level) -> Result<Isa, String> {
        if level <= Isa::detected().0 {
            return Ok(Isa(level));
        }
        let missing: Vec<&str> = level.features().iter().copied().filter(|f| !has(f)).collect();
        let usable: Vec<&str> = Isa::supported().iter().map(|i| i.0.name()).collect();
        Err(format!(
            "{} needs {} (this CPU lacks {}); levels this CPU runs: {}",
            level.name(),
            level.features().join(", "),
            missing.join(", "),
            usable.join(", ")
        ))
    }

    /// The level in use: the one [`set`] chose, else `DIFATTN_CPU_ISA`'s, else the best detected. A bad
    /// `DIFATTN_CPU_ISA` (an unknown name, or a level this CPU lacks) is the error every kernel call returns.
    pub fn active() -> Result<Isa, String> {
        match OVERRIDE.load(Ordering::Relaxed) {
            0 => from_env().clone(),
            code => Ok(Isa(Level::ALL[usize::from(code) - 1])),
        }
    }

    /// [`Isa::active`], or the best detected level while `DIFATTN_CPU_ISA` is bad (the kernels' entry points have
    /// reported that error already: this is for the vector helpers inside them).
    #[inline]
    pub fn current() -> Isa {
        Isa::active().unwrap_or_else(|_| Isa::detected())
    }
}

/// `[`set`]'s choice: 0 none, else the level's index + 1.
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

fn from_env() -> &'static Result<Isa, String> {
    static FROM_ENV: OnceLock<Result<Isa, String>> = OnceLock::new();
    FROM_ENV.get_or_init(|| match std::env::var(ENV) {
        Err(std::env::VarError::NotPresent) => Ok(Isa::detected()),
        Ok(v) if v.trim().is_empty() => Ok(Isa::detected()),
        Ok(v) => match Level::parse(&v) {
            Some(level) => Isa::new(level).map_err(|e| format!("{ENV}={v}: {e}")),
            None => Err(format!("{ENV}={v}: unknown level; expected one of scalar, avx2, avx512, avx512bf16")),
        },
        Err(e) => Err(format!("{ENV}: {e}")),
    })
}

/// Makes `level` the one in use in this process (`None`: back to `DIFATTN_CPU_ISA` or the best detected); an error
/// when this CPU lacks it. Kernels running meanwhile may finish on either level (each is exact on its own).
pub fn set(level: Option<Level>) -> Result<Isa, String> {
    match level {
        None => {
            OVERRIDE.store(0, Ordering::Relaxed);
            Isa::active()
        }
        Some(level) => {
            let isa = Isa::new(level)?;
            let code = Level::ALL.iter().position(|&l| l == level).expect("a level of ALL") + 1;
            OVERRIDE.store(code as u8, Ordering::Relaxed);
            Ok(isa)
        }
    }
}

/// Defines `fn $name(isa: Isa, args…) -> R` that runs `$body::<FMA, W>(args…)` compiled for `isa`: for AVX-512
/// (F/BW/DQ/VL) with `W = 16` f32 lanes per vector, for AVX2+FMA with `W = 8`, or for the target's baseline with
/// `FMA = false`, `W = 8`. The body is `#[inline(always)]` (as everything it calls), so each clone is the whole
/// kernel compiled for its instruction set.
#[macro_export]
macro_rules! isa_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::cpu::isa::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                $body::<true, 16>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                $body::<true, 8>($($arg),*)
            }
            match isa.level() {
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::isa::Level::Avx512 | $crate::cpu::isa::Level::Avx512Bf16 => {
                    // SAFETY: an `Isa` holds only a level whose features this CPU has (checked at run time).
                    unsafe { avx512($($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::isa::Level::Avx2 => {
                    // SAFETY: an `Isa` holds only a level whose features this CPU has (checked at run time).
                    unsafe { avx2($($arg),*) }
                }
                _ => $body::<false, 8>($($arg),*),
            }
        }
    };
}

/// Held by the unit tests that change the level in use ([`set`] is process-wide and tests run in parallel).
#[cfg(test)]
pub(crate) static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_order_and_clamp_to_the_cpu() {
        for level in Level::ALL {
            assert_eq!(Level::parse(level.name()), Some(level));
        }
        assert_eq!(Level::parse(" AVX2 "), Some(Level::Avx2));
        assert_eq!(Level::parse("sse4"), None);
        let best = Isa::detected().level();
        let supported = Isa::supported();
        assert_eq!(supported.first().map(|i| i.level()), Some(Level::Scalar));
        assert_eq!(supported.last().map(|i| i.level()), Some(best));
        for level in Level::ALL {
            match Isa::new(level) {
                Ok(isa) => assert!(isa.level() <= best),
                Err(e) => assert!(level > best && e.contains("lacks"), "{e}"),
            }
        }
    }

    #[test]
    fn set_overrides_and_refuses_what_the_cpu_lacks() {
        let _lock = TEST_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = Isa::active();
        assert_eq!(set(Some(Level::Scalar)).map(|i| i.level()), Ok(Level::Scalar));
        assert_eq!(Isa::current().level(), Level::Scalar);
        if Isa::detected().level() < Level::Avx512Bf16 {
            assert!(set(Some(Level::Avx512Bf16)).is_err());
            assert_eq!(Isa::current().level(), Level::Scalar, "a refused level leaves the choice as it was");
        }
        assert_eq!(set(None), before);
    }
}
