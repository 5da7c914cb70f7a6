//! Builds the kernels in kernels/*.cu twice over:
//! - always, for the `sim` device: the host C++ compiler builds every .cu against
//!   kernels/sim/cuda_shim.h together with the fiber runtime, plus one generated trampoline per
//!   `extern "C" __global__` function;
//! - when nvcc is found (env `NVCC`, then `$CUDA_HOME/bin/nvcc`, then `PATH`), into one fatbin with
//!   sm_80 and sm_90 machine code and compute_80 PTX (A100, H100 and anything newer by JIT), embedded
//!   in the binary under `cfg(unet3d_kernels)`.
//!
//! It also writes the kernel table both devices launch from (src/device/launch.rs includes it).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// nvcc architectures: machine code for each, PTX for the first so newer GPUs can JIT it.
const SASS_ARCHS: [&str; 2] = ["80", "90"];

struct KernelDecl {
    name: String,
    file: String,
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kdir = root.join("kernels");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rustc-check-cfg=cfg(unet3d_kernels)");

    let sources = kernel_sources(&kdir);
    let mut kernels = Vec::new();
    for src in &sources {
        let text = fs::read_to_string(src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
        let file = src.file_name().unwrap().to_string_lossy().into_owned();
        for name in kernel_names(&strip_comments(&text), &file) {
            if let Some(prev) = kernels.iter().find(|k: &&KernelDecl| k.name == name) {
                panic!("kernel `{name}` is defined in both {} and {file}", prev.file);
            }
            kernels.push(KernelDecl { name, file: file.clone() });
        }
    }

    build_sim(&kdir, &out, &sources, &kernels);
    fs::write(out.join("kernel_table.rs"), kernel_table(&kernels)).expect("writing kernel_table.rs");

    match find_nvcc() {
        Some(nvcc) => {
            build_fatbin(&nvcc, &kdir, &out, &sources);
            println!("cargo::rustc-cfg=unet3d_kernels");
        }
        None => println!(
            "cargo::warning=nvcc not found (set NVCC or CUDA_HOME): building without CUDA kernels; \
             the cuda device will report that it has none, the sim device runs them on the CPU"
        ),
    }
}

fn kernel_sources(kdir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(kdir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kdir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    v.sort();
    v
}

/// Source text with comments blanked out, so commented-out kernels are not picked up.
fn strip_comments(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i = (i + 2).min(b.len());
            out.push(' ');
        } else {
            let ch = s[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Names of the `extern "C" __global__ void [__launch_bounds__(..)] name(` kernels of one file.
fn kernel_names(src: &str, file: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(pos) = rest.find("__global__") {
        let before = rest[..pos].trim_end();
        let after = rest[pos + "__global__".len()..].trim_start();
        assert!(
            before.ends_with("extern \"C\""),
            "{file}: every __global__ function must be declared `extern \"C\" __global__` \
             (the launch layer finds kernels by their unmangled names)"
        );
        let after = after
            .strip_prefix("void")
            .unwrap_or_else(|| panic!("{file}: a __global__ function must return void"))
            .trim_start();
        let after = match after.strip_prefix("__launch_bounds__") {
            Some(lb) => {
                let close = lb.find(')').unwrap_or_else(|| panic!("{file}: unclosed __launch_bounds__"));
                lb[close + 1..].trim_start()
            }
            None => after,
        };
        let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        let name = &after[..end];
        assert!(
            !name.is_empty() && after[end..].trim_start().starts_with('('),
            "{file}: cannot read the kernel name after `__global__ void`"
        );
        names.push(name.to_string());
        rest = &after[end..];
    }
    names
}

/// One translation unit for the whole sim build, as for nvcc, so the two see the same code.
fn build_sim(kdir: &Path, out: &Path, sources: &[PathBuf], kernels: &[KernelDecl]) {
    let mut tu = String::from("// Generated by build.rs: every kernel source, then its sim entry points.\n");
    tu.push_str("#include \"cuda_shim.h\"\n");
    for s in sources {
        writeln!(tu, "#include \"{}\"", s.display()).unwrap();
    }
    for k in kernels {
        writeln!(tu, "UNET3D_SIM_EXPORT({})", k.name).unwrap();
    }
    let tu_path = out.join("unet3d_sim_kernels.cpp");
    fs::write(&tu_path, tu).expect("writing the sim translation unit");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .include(kdir.join("sim"))
        .include(kdir)
        .file(&tu_path)
        .file(kdir.join("sim/fiber.cpp"))
        // The sim is slow enough already; its kernels are not debugged at -O0.
        .opt_level(2)
        .flag("-fno-strict-aliasing")
        .warnings(true)
        .extra_warnings(true)
        .compile("unet3d_sim");
}

fn kernel_table(kernels: &[KernelDecl]) -> String {
    let mut s = String::from("// Generated by build.rs from kernels/*.cu.\n\nunsafe extern \"C\" {\n");
    for k in kernels {
        writeln!(s, "    fn unet3d_sim_tramp_{}(params: *mut *mut std::ffi::c_void);", k.name).unwrap();
        writeln!(s, "    fn unet3d_sim_sig_{}() -> *const std::ffi::c_char;", k.name).unwrap();
    }
    writeln!(s, "}}\n\nstatic KERNEL_TABLE: [KernelEntry; {}] = [", kernels.len()).unwrap();
    for k in kernels {
        writeln!(
            s,
            "    KernelEntry {{ name: \"{n}\", file: \"{f}\", sim: unet3d_sim_tramp_{n}, sig: unet3d_sim_sig_{n} }},",
            n = k.name,
            f = k.file
        )
        .unwrap();
    }
    s.push_str("];\n\nimpl Kernel {\n");
    for (i, k) in kernels.iter().enumerate() {
        writeln!(s, "    /// `{}` in kernels/{}.", k.name, k.file).unwrap();
        writeln!(s, "    pub const {}: Kernel = Kernel({i});", k.name.to_uppercase()).unwrap();
    }
    s.push_str("}\n");
    s
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "NVCC={} is not a file", p.display());
        return Some(p);
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(home).join("bin/nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    env::split_paths(&env::var_os("PATH")?).map(|d| d.join("nvcc")).find(|p| p.is_file())
}

fn build_fatbin(nvcc: &Path, kdir: &Path, out: &Path, sources: &[PathBuf]) {
    let mut tu = String::from("// Generated by build.rs: every kernel source in one module.\n");
    for s in sources {
        writeln!(tu, "#include \"{}\"", s.display()).unwrap();
    }
    let tu_path = out.join("unet3d_kernels.cu");
    fs::write(&tu_path, tu).expect("writing the nvcc translation unit");
    let fatbin = out.join("unet3d_kernels.fatbin");
    let mut cmd = Command::new(nvcc);
    cmd.args(["-fatbin", "-std=c++17", "-O3"]).arg("-I").arg(kdir);
    for a in SASS_ARCHS {
        cmd.arg("-gencode").arg(format!("arch=compute_{a},code=sm_{a}"));
    }
    cmd.arg("-gencode").arg(format!("arch=compute_{0},code=compute_{0}", SASS_ARCHS[0]));
    cmd.arg("-o").arg(&fatbin).arg(&tu_path);
    let res = cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    assert!(
        res.status.success(),
        "nvcc failed on kernels/*.cu:\n{}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}
