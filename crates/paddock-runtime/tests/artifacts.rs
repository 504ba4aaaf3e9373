//! Compiling components and loading artifacts: what is accepted and what is refused, with which error.

use paddock_runtime::{AppSpec, Limits, LoadError, Runtime, RuntimeConfig, sha256_hex};

fn runtime() -> Runtime {
    Runtime::new(&RuntimeConfig {
        max_instances: 4,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

fn hello() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/apps/packages/hello-v1/hello.wasm"
    ))
    .unwrap()
}

fn spec(component: &[u8]) -> AppSpec {
    AppSpec {
        name: "hello".into(),
        version: "v1".into(),
        route: "/hello".into(),
        component_sha256: sha256_hex(component),
        limits: Limits::default(),
        config: Default::default(),
    }
}

#[test]
fn a_compiled_artifact_loads_and_names_its_engine_and_component() {
    let rt = runtime();
    let component = hello();
    let artifact = rt.compile(&component).unwrap();
    assert_eq!(artifact.header.engine, rt.engine_hash());
    assert_eq!(artifact.header.component_sha256, sha256_hex(&component));
    let version = rt.load(spec(&component), artifact.as_bytes()).unwrap();
    assert_eq!(version.spec().version, "v1");
    // The engine hash is stable: another engine of the same configuration agrees.
    assert_eq!(runtime().engine_hash(), rt.engine_hash());
}

#[test]
fn loading_refuses_an_artifact_of_another_component() {
    let rt = runtime();
    let component = hello();
    let artifact = rt.compile(&component).unwrap();
    let mut other = spec(&component);
    other.component_sha256 = sha256_hex(b"another component");
    let err = rt.load(other, artifact.as_bytes()).unwrap_err();
    assert!(matches!(err, LoadError::ComponentMismatch { .. }), "{err}");
}

#[test]
fn loading_refuses_an_artifact_of_another_engine() {
    let rt = runtime();
    let component = hello();
    let artifact = rt.compile(&component).unwrap();
    // Change one digit of the engine hash in the header.
    let mut bytes = artifact.as_bytes().to_vec();
    let engine = rt.engine_hash().as_bytes();
    let at = bytes
        .windows(engine.len())
        .position(|w| w == engine)
        .unwrap();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    let err = rt.load(spec(&component), &bytes).unwrap_err();
    assert!(matches!(err, LoadError::EngineMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("compile the component again"),
        "{err}"
    );
}

#[test]
fn loading_refuses_a_damaged_payload() {
    let rt = runtime();
    let component = hello();
    let mut bytes = rt.compile(&component).unwrap().as_bytes().to_vec();
    let middle = bytes.len() - 1000;
    bytes[middle] ^= 0x40;
    let err = rt.load(spec(&component), &bytes).unwrap_err();
    assert!(matches!(err, LoadError::ArtifactDamaged(_)), "{err}");
    let err = rt
        .load(spec(&component), &bytes[..bytes.len() / 2])
        .unwrap_err();
    assert!(matches!(err, LoadError::ArtifactDamaged(_)), "{err}");
}

#[test]
fn compile_refuses_what_is_not_a_wasi_http_component() {
    let rt = runtime();
    let cases: [(&[u8], &str); 4] = [
        (
            b"\0asm\x01\0\0\0garbage",
            "not a valid WebAssembly component",
        ),
        // A core module, not a component.
        (b"(module)", "not a valid WebAssembly component"),
        // A component that exports no HTTP handler.
        (b"(component)", "not a wasi:http/proxy app"),
        // A component that imports an interface Paddock does not provide.
        (
            b"(component (import \"acme:db/query@1.0.0\" (instance (export \"run\" (func)))))",
            "imports what Paddock does not provide (component imports instance `acme:db/query@1.0.0`",
        ),
    ];
    for (component, expected) in cases {
        let err = rt.compile(component).unwrap_err();
        assert!(
            err.to_string().contains(expected),
            "{}: {err}",
            String::from_utf8_lossy(component)
        );
    }
}
