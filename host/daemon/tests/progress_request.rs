//! The `progress` control request: what `freehint migrate` polls for its
//! progress bar.

use freehint_daemon::{ControlReply, ControlRequest, DaemonConfig, VmDaemon};

#[test]
fn a_daemon_without_a_migration_reports_no_progress() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = VmDaemon::new(DaemonConfig {
        vhost_socket: dir.path().join("vm.vhost"),
        qmp_socket: dir.path().join("vm.qmp"),
        control_socket: dir.path().join("vm.ctl"),
        incoming: None,
        resume: true,
        preallocate: false,
        state_dir: dir.path().to_path_buf(),
        agent_socket: None,
        tls: None,
    })
    .unwrap();
    let req: ControlRequest = serde_json::from_str(r#"{"cmd":"progress"}"#).unwrap();
    let reply = daemon.handle_request(req).unwrap();
    assert_eq!(reply, ControlReply::Progress { progress: None });
    assert_eq!(
        serde_json::to_string(&reply).unwrap(),
        r#"{"result":"progress","progress":null}"#
    );
    assert_eq!(daemon.status().progress, None);
}
