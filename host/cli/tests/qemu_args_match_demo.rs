//! `freehint qemu-args` prints what tests/demo really starts QEMU with
//! (the demo and the real-guest tests are what proves those options work).

use std::path::Path;
use std::process::Command;

/// The (option, value) pairs of an argv.
fn pairs(args: &[String]) -> Vec<(String, String)> {
    args.windows(2)
        .filter(|w| w[0].starts_with('-') && !w[1].starts_with('-'))
        .map(|w| (w[0].clone(), w[1].clone()))
        .collect()
}

#[test]
fn qemu_args_are_the_options_the_demo_starts_qemu_with() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let ram = dir.path().join("src.ram");
    let (vhost, qmp) = (Path::new("/run/fh/src.vhost"), Path::new("/run/fh/src.qmp"));
    let agent = Path::new("/run/fh/src.agent");
    let preload = Path::new("/opt/freehint/libfreehint_preload.so");

    // The demo's destination QEMU (tests/demo: guest_cmd + freehint_qemu).
    let mut demo = Command::new("qemu-system-x86_64");
    freehint_demo::guest_args(&mut demo, Path::new("/guest"), &ram, 2048, "");
    demo.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    freehint_demo::freehint_device_args(&mut demo, preload, vhost);
    demo.args(freehint_demo::agent_port_args(agent));
    demo.args(["-incoming", "defer"]);
    let demo_args: Vec<String> = demo
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let demo_env: Vec<(String, String)> = demo
        .get_envs()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.unwrap().to_string_lossy().into_owned(),
            )
        })
        .collect();

    let out = Command::new(env!("CARGO_BIN_EXE_freehint"))
        .arg("qemu-args")
        .arg("--ram")
        .arg(&ram)
        .args(["--mem-mib", "2048", "--vhost-socket"])
        .arg(vhost)
        .arg("--qmp")
        .arg(qmp)
        .arg("--agent-socket")
        .arg(agent)
        .arg("--preload")
        .arg(preload)
        .args(["--incoming", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let env: Vec<(String, String)> = f["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    assert_eq!(env, demo_env);
    let args: Vec<String> = f["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let demo_pairs = pairs(&demo_args);
    for pair in pairs(&args) {
        assert!(
            demo_pairs.contains(&pair),
            "{pair:?} is not in the demo's QEMU command line {demo_args:?}"
        );
    }
    // And everything freehint needs from the demo's line is printed: the
    // memory backend, the machine's use of it, the size, the device and
    // its chardev, QMP and -incoming.
    for opt in ["-object", "-m", "-chardev", "-device", "-qmp", "-incoming"] {
        assert!(args.contains(&opt.to_string()), "{opt} missing: {args:?}");
    }
    assert!(args.contains(&"memory-backend=mem0".to_string()));
    assert!(
        args.iter().any(|a| a.starts_with("virtserialport,")),
        "the agent's port: {args:?}"
    );
}
