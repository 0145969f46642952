//! The setup most scenarios share: a sandbox, an upstream repository with history, and the HTTP
//! server serving it.

use std::path::PathBuf;

use crate::fixture::Upstream;
use crate::http_server::GitHttpServer;
use crate::sandbox::{Finished, Invocation, Sandbox};

pub struct Served {
    /// Declared first so it stops before the sandbox's files go away.
    pub server: GitHttpServer,
    pub upstream: Upstream,
    pub url: String,
    pub sandbox: Sandbox,
}

impl Served {
    /// `name` (e.g. `acme/widgets.git`) created in a new sandbox and served over smart HTTP.
    pub fn new(name: &str) -> Served {
        let sandbox = Sandbox::new();
        let upstream = sandbox.upstream(name);
        let server = GitHttpServer::start(&sandbox.server_root);
        let url = server.url(name);
        Served {
            server,
            upstream,
            url,
            sandbox,
        }
    }

    /// A mirror of the served repository at `mirrors/<relative>`.
    pub fn mirror(&self, relative: &str) -> PathBuf {
        self.sandbox.mirror(&self.url, relative)
    }

    /// The checkout hook for `commit` on `branch` of the served repository, to add settings to.
    pub fn hook(&self, commit: &str, branch: &str) -> Invocation {
        self.sandbox.hook().job(&self.url, commit, branch)
    }

    /// Runs the checkout hook for `commit` on `branch` of the served repository.
    pub fn checkout(&self, commit: &str, branch: &str) -> Finished {
        self.hook(commit, branch).run()
    }
}
