//! A burst of simultaneous connections between two STRICT pods, in the suite's own debug
//! build, where handshakes are slow (as on a heavily loaded node): every connection must
//! succeed. Found by hand: with `protocol_detect_timeout_ms = 1000`, the server side
//! refused slow ClientHellos as "plaintext" and the client side blamed its TCP connect.

mod common;

use common::*;

#[test]
fn two_thousand_simultaneous_mtls_connects_all_succeed() {
    let Some(node) = node("mtls_burst", &["a", "b"]) else {
        return;
    };
    // The plain redirect in both passes of the suite: the splice has a burst test of its
    // own (accel.rs), which it does not pass yet.
    let burst = mtls_burst(&node, "accelerate = false");
    burst.assert_all_ok();
}
