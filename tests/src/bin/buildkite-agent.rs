//! The stand-in `buildkite-agent`; see `stateless_e2e::standin_agent` for what it models.

fn main() -> std::process::ExitCode {
    stateless_e2e::standin_agent::main()
}
