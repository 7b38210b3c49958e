//! The release archive (`make dist`, scripts/dist.sh): installed the way the
//! README says, without a Rust toolchain (the stripped `pgcache.so` on the
//! load line, `sql/pgcache.sql` in the database), it serves and invalidates.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

#[test]
fn the_release_archive_installs_and_serves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let packed = Command::new("bash")
        .arg(root.join("scripts/dist.sh"))
        .arg(module_path())
        .arg(out.path())
        .output()
        .expect("run scripts/dist.sh");
    assert!(
        packed.status.success(),
        "scripts/dist.sh failed: {}",
        String::from_utf8_lossy(&packed.stderr)
    );
    let version = env!("CARGO_PKG_VERSION");
    let archive = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "gz"))
        .expect("an archive in the output folder");
    let file_name = archive.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        file_name.starts_with(&format!("pgcache-{version}-")) && file_name.ends_with(".tar.gz"),
        "archive name {file_name}"
    );
    let unpacked = tempfile::tempdir().unwrap();
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(unpacked.path())
        .status()
        .unwrap();
    assert!(untar.success());
    let dir = unpacked.path().join(file_name.trim_end_matches(".tar.gz"));
    for f in [
        "pgcache.so",
        "sql/pgcache.sql",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
    ] {
        assert!(dir.join(f).is_file(), "the archive holds {f}");
    }
    let so = dir.join("pgcache.so");
    let size = std::fs::metadata(&so).unwrap().len();
    let built = std::fs::metadata(module_path()).unwrap().len();
    assert!(
        size < built / 2 && size < 20 << 20,
        "pgcache.so is stripped: {size} bytes (built: {built})"
    );

    let pg = PgServer::start_new();
    pg.execute(&std::fs::read_to_string(dir.join("sql/pgcache.sql")).unwrap());
    pg.execute("SELECT pgcache_watch('users')");
    let r = RedisServer::builder()
        .module_args(&pg.module_args())
        .module_file(&so)
        .start();
    wait_listener_ready(&r);
    let mut c = r.con();
    assert_eq!(info_field(&mut c, "pgcache", "pgcache_version"), version);
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#)["id"], 1);
    pg.execute("UPDATE users SET name = 'from the archive' WHERE id = 1");
    wait_gone(&mut c, r#"pg_cache:users:{"id":1}"#);
    assert_eq!(
        read_row(&mut c, "users", r#"{"id":1}"#)["name"],
        "from the archive"
    );
}
