//! Submodules, as the agent's default checkout does them — sync, update recursively with
//! `--force`, then `reset --hard` everywhere — except that each submodule borrows from its own
//! mirror in the volume (found like the main repository's), where the agent passes one mirror
//! per URL to an update of every submodule.

use stateless_core::repo_url::RepoUrl;

use crate::checkout::Checkout;
use crate::error::{CheckoutError, Step};
use crate::mirror_select;

/// A submodule as `git submodule init` resolved it.
struct Submodule {
    path: String,
    url: String,
}

impl Checkout<'_> {
    pub(crate) async fn update_submodules(&self) -> Result<(), CheckoutError> {
        let dir = &self.plan.checkout_dir;
        if !dir.join(".gitmodules").is_file() {
            return Ok(());
        }
        if self.plan.sparse.is_some() {
            // As the agent: a sparse checkout is for a part of the tree, and initialising
            // every submodule would defeat it.
            tracing::warn!("Submodule initialization skipped during sparse checkout");
            return Ok(());
        }
        let Some(settings) = &self.plan.submodules else {
            tracing::warn!("this repository has submodules, but BUILDKITE_GIT_SUBMODULES is false; not checking them out");
            return Ok(());
        };
        let mut sync = self.command();
        sync.args(["submodule", "sync", "--recursive"]);
        if let Err(e) = self.git_step(Step::Submodules, sync, &self.local).await {
            tracing::warn!("could not sync submodule URLs: {e}");
        }
        let mut init = self.command();
        init.args(["submodule", "init"]);
        self.git_step(Step::Submodules, init, &self.local).await?;
        for submodule in self.submodules()? {
            let url = RepoUrl::parse(&submodule.url).ok();
            let mirror = url.as_ref().and_then(|url| {
                let choice = mirror_select::choose(self.plan.mirrors_root.as_deref(), url);
                if let Some(why) = &choice.miss_reason {
                    tracing::info!("submodule {}: no mirror ({why})", submodule.path);
                }
                choice.mirror
            });
            let reference = mirror.map(|m| m.real_path.display().to_string());
            let updated = self
                .update_one(settings, &submodule, reference.as_deref())
                .await;
            match (updated, reference) {
                (Err(e), Some(_)) => {
                    tracing::warn!(
                        "submodule {} failed with its mirror ({e}); redoing it without",
                        submodule.path
                    );
                    self.forget(&submodule)?;
                    self.update_one(settings, &submodule, None).await?;
                }
                (result, _) => result?,
            }
        }
        let mut reset = self.command();
        reset.args(["submodule", "foreach", "--recursive", "git reset --hard"]);
        self.git_step(Step::Submodules, reset, &self.local).await
    }

    async fn update_one(
        &self,
        settings: &crate::checkout_plan::Submodules,
        submodule: &Submodule,
        reference: Option<&str>,
    ) -> Result<(), CheckoutError> {
        let mut cmd = self.command();
        for kv in &settings.clone_config {
            cmd.args(["-c", kv]);
        }
        cmd.args([
            "submodule",
            "update",
            "--init",
            "--recursive",
            "--force",
            "--progress",
        ]);
        if let Some(path) = reference {
            cmd.args(["--reference", path]);
        }
        cmd.operands([submodule.path.as_str()]);
        self.git_step(Step::Submodules, cmd, &self.network).await
    }

    /// Removes a half-made submodule clone, so it can be redone from scratch.
    fn forget(&self, submodule: &Submodule) -> Result<(), CheckoutError> {
        let dir = &self.plan.checkout_dir;
        let repo = git2::Repository::open(dir).map_err(|e| self.prepare_error(e.to_string()))?;
        let name = repo
            .submodules()
            .ok()
            .and_then(|subs| {
                subs.iter()
                    .find(|s| s.path().to_str() == Some(&submodule.path))
                    .and_then(|s| s.name().ok().map(str::to_string))
            })
            .unwrap_or_else(|| submodule.path.clone());
        for path in [
            dir.join(".git/modules").join(name),
            dir.join(&submodule.path),
        ] {
            if path.exists() {
                std::fs::remove_dir_all(&path).map_err(|e| self.prepare_error(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Each submodule's path and its URL as `submodule init` resolved it (relative URLs are
    /// relative to origin's).
    fn submodules(&self) -> Result<Vec<Submodule>, CheckoutError> {
        let fail = |e: git2::Error| self.prepare_error(format!("reading .gitmodules: {e}"));
        let repo = git2::Repository::open(&self.plan.checkout_dir).map_err(fail)?;
        let config = repo.config().map_err(fail)?.snapshot().map_err(fail)?;
        let subs = repo.submodules().map_err(fail)?;
        Ok(subs
            .iter()
            .filter_map(|s| {
                let name = s.name().ok()?;
                let url = config
                    .get_string(&format!("submodule.{name}.url"))
                    .ok()
                    .or_else(|| s.url().ok().flatten().map(str::to_string))?;
                Some(Submodule {
                    path: s.path().to_str()?.to_string(),
                    url,
                })
            })
            .collect())
    }
}
