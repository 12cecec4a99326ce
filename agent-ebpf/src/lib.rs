// The programs live in the `agent-ebpf` binary; this empty library exists so that `agent`
// can list the crate as a build-dependency and be rebuilt when it changes.
#![no_std]
