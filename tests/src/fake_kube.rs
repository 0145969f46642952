//! A fake Kubernetes API server on loopback, for the dispatcher's scenarios: real clients (a real
//! `kubectl`, the dispatcher's kube-rs client) talk to it over HTTP/1.1. No real API server can
//! run here (`../shared/notes/dispatch-peers.md` §5), so this one is held to the API's own
//! conventions (kubernetes.io "API Concepts", the `meta/v1` types) where a client can tell:
//!
//! - **Discovery**: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<group>/<version>` list the
//!   kinds served: configmaps, persistentvolumeclaims, pods, secrets, events, serviceaccounts,
//!   nodes and namespaces (v1, the last two cluster-scoped), daemonsets and deployments (apps/v1),
//!   jobs and cronjobs (batch/v1), roles and rolebindings (rbac.authorization.k8s.io/v1), leases
//!   (coordination.k8s.io/v1),
//!   volumesnapshots (snapshot.storage.k8s.io/v1), and the `pods/eviction` subresource (policy/v1
//!   `Eviction`, which `kubectl drain` looks for). A new claim gets the
//!   `kubernetes.io/pvc-protection` finalizer, as the StorageObjectInUseProtection admission
//!   plugin adds it.
//! - **Reads**: get, and list with `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`,
//!   `k in (a,b)`, `k notin (a,b)`) and `fieldSelector` (`path=v`, `path!=v` on any field, e.g.
//!   `metadata.name`, `status.phase`, `reason`, `involvedObject.name`); the list's
//!   `metadata.resourceVersion` is the store's. With `limit`, the list comes in pages with
//!   `continue` tokens, each page a part of the one list taken at the first page's
//!   resourceVersion; a token older than the watch history gets 410 `Expired`. The dispatcher's
//!   watchers list this way (kube-runtime 5.0.0, `src/watcher.rs`: `page_size` 500 by default).
//! - **Watch** (`watch=true`): from `resourceVersion` (unset or `0`: an `ADDED` for every object,
//!   then changes), `BOOKMARK` events when `allowWatchBookmarks=true`, the stream closed at
//!   `timeoutSeconds`; a resourceVersion older than the kept history gets the `ERROR` event with
//!   a 410 `Expired` Status, as an etcd compaction causes ([`FakeKube::compact`]).
//! - **Writes**: create (`generateName` gets 5 random characters; 409 `AlreadyExists`; a Secret's
//!   `stringData` merged into `data`, as the server converts it), replace
//!   (409 `Conflict` on a stale `metadata.resourceVersion`), the `/status` subresource, merge and
//!   strategic-merge patches (the latter applied as a merge patch: none of these kinds needs
//!   list merging here), server-side apply with field ownership (a field another `fieldManager`
//!   set to another value is a 409 `Conflict` unless `force=true`; a patch's `null` gives the
//!   field up; which Lease-based leader election relies on), delete (objects with finalizers,
//!   and pods bound to a node that have not ended, get a `deletionTimestamp` and stay: a pod
//!   with `deletionGracePeriodSeconds`, the delete's `gracePeriodSeconds` or else its
//!   `terminationGracePeriodSeconds`, which a later delete may only shorten, until its kubelet
//!   has stopped it and deleted it for good; any of them until its last finalizer is removed,
//!   when it goes; a Job's pods go with it unless `propagationPolicy=Orphan`). Every write
//!   bumps the resourceVersion and is seen by watchers.
//! - **Eviction** (`POST …/pods/<name>/eviction`, `pkg/registry/core/pod/storage/eviction.go`):
//!   no PodDisruptionBudget to consult, so the pod gets `DisruptionTarget=True`, reason
//!   `EvictionByEvictionAPI`, message "Eviction API: evicting", and is deleted with the
//!   Eviction's `deleteOptions`; the answer is 201 with a `Success` Status.
//! - **The rest of a cluster** (Job controller, scheduler, nodes, quota, kubelet) is
//!   [`crate::fake_cluster`], which works on this store.
//! - **Faults** on request ([`FakeKube::inject`]): a status (403, 409, 429 with `Retry-After`,
//!   500, 503, each with the real server's `reason`) for the next matching requests.
//!
//! Every namespace exists and is `Active`; a Namespace created is stored (as are ServiceAccounts,
//! Roles, RoleBindings, Deployments and CronJobs: an install's other kinds, which nothing here
//! acts on).
//!
//! Not modelled: authentication and RBAC, PodDisruptionBudgets, admission beyond the above,
//! server-side apply's `managedFields` in the object (ownership is kept aside) and list merging,
//! Table output (`kubectl get` needs `-o json`, `-o name` or the like), OpenAPI (`kubectl create`
//! needs `--validate=false`).

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::http_server::{percent_decode, serve_connection, Request};

/// Whether a real `kubectl` is here to check the fake with; says why not when it is not.
pub fn kubectl_installed() -> bool {
    let ok = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: kubectl is not installed (bash tests/provision.sh installs it)");
    }
    ok
}

/// Whether `kubectl`'s kustomize is version 5 or later, which the install unit needs
/// (components, `labels`); says why not when it is not (Debian's kubectl 1.20 has kustomize 2).
pub fn kustomize_5() -> bool {
    if !kubectl_installed() {
        return false;
    }
    let out = std::process::Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output();
    let version: Value = out
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default();
    let kustomize = version["kustomizeVersion"].as_str().unwrap_or("none");
    let major = kustomize.trim_start_matches('v').split('.').next();
    let ok = major
        .and_then(|m| m.parse::<u32>().ok())
        .is_some_and(|m| m >= 5);
    if !ok {
        eprintln!("skipping: kubectl's kustomize is {kustomize}; the install unit needs kustomize 5 (kubectl 1.27 or later)");
    }
    ok
}

/// A Secret's write-only `stringData`, merged into `data` (base64) and dropped, as the API server
/// converts it (kubernetes `pkg/apis/core/v1/conversion.go`, `Convert_v1_Secret_To_core_Secret`:
/// "StringData overwrites Data"); readers see only `data`.
fn merge_string_data(secret: &mut Value) {
    use base64::Engine;
    let Some(Value::Object(plain)) = secret.as_object_mut().and_then(|s| s.remove("stringData"))
    else {
        return;
    };
    if !secret["data"].is_object() {
        secret["data"] = json!({});
    }
    for (key, value) in plain {
        let text = value.as_str().unwrap_or_default();
        let encoded = base64::engine::general_purpose::STANDARD.encode(text);
        secret["data"][key] = json!(encoded);
    }
}

/// A pod of `job` named `name`, as its Job controller would make it (the template's labels, the
/// Job as its controlling owner), for a test that plays the kubelet itself.
pub fn pod_of_job(job: &Value, name: &str) -> Value {
    let labels = job["spec"]["template"]["metadata"]["labels"].clone();
    json!({"metadata": {"name": name, "labels": labels, "ownerReferences": [{
        "apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"], "controller": true}]}})
}

/// A kind the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    /// Whether its objects live in a namespace (Nodes do not).
    pub namespaced: bool,
}

impl Kind {
    const fn new(group: &'static str, plural: &'static str, kind: &'static str) -> Kind {
        Kind {
            group,
            version: "v1",
            plural,
            kind,
            namespaced: true,
        }
    }

    fn api_version(&self) -> String {
        match self.group {
            "" => self.version.to_string(),
            g => format!("{g}/{}", self.version),
        }
    }
}

pub const KINDS: [Kind; 16] = [
    Kind::new(
        "snapshot.storage.k8s.io",
        "volumesnapshots",
        "VolumeSnapshot",
    ),
    Kind::new("", "configmaps", "ConfigMap"),
    Kind::new("apps", "daemonsets", "DaemonSet"),
    Kind::new("", "persistentvolumeclaims", "PersistentVolumeClaim"),
    Kind::new("", "pods", "Pod"),
    Kind::new("", "secrets", "Secret"),
    Kind::new("", "events", "Event"),
    Kind::new("batch", "jobs", "Job"),
    Kind::new("coordination.k8s.io", "leases", "Lease"),
    Kind {
        namespaced: false,
        ..Kind::new("", "nodes", "Node")
    },
    // Stored, never acted on: what an install applies besides the kinds above (the test plays
    // the Deployment's part itself, tests/tests/quick_start.rs).
    Kind {
        namespaced: false,
        ..Kind::new("", "namespaces", "Namespace")
    },
    Kind::new("", "serviceaccounts", "ServiceAccount"),
    Kind::new("rbac.authorization.k8s.io", "roles", "Role"),
    Kind::new("rbac.authorization.k8s.io", "rolebindings", "RoleBinding"),
    Kind::new("apps", "deployments", "Deployment"),
    Kind::new("batch", "cronjobs", "CronJob"),
];

/// The finalizer that keeps a claim while a pod uses it.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";

/// How many changes a watch can resume from; older resourceVersions get 410 Gone.
const HISTORY: usize = 10_000;

/// A change, as watchers see it.
#[derive(Clone)]
struct Change {
    rv: u64,
    plural: &'static str,
    deleted: bool,
    object: Value,
}

/// An object's key: `(plural, namespace, name)`.
pub(crate) type Key = (&'static str, String, String);

#[derive(Default)]
pub(crate) struct Store {
    /// `(plural, namespace, name)` → object.
    pub(crate) objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Change>,
    /// Changes at or before this resourceVersion can no longer be watched from.
    compacted: u64,
    faults: VecDeque<(Option<String>, Option<&'static str>, u16)>,
    uid: u64,
    /// Server-side apply's field ownership: object key → field path → field manager.
    owners: BTreeMap<Key, BTreeMap<String, String>>,
    /// Requests served, `METHOD plural` (or the path for discovery), for assertions.
    log: Vec<String>,
    /// A paged list's pages still to serve: `continue` token → (its resourceVersion, items).
    pages: BTreeMap<u64, (u64, VecDeque<Value>)>,
}

struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
}

/// A handle on the server; clones share it.
#[derive(Clone)]
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeKube {
    pub fn start() -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: Condvar::new(),
        });
        let serving = shared.clone();
        crate::loopback::serve_each(listener, move |stream| {
            let _ = serve(stream, &serving);
        });
        FakeKube { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server and `namespace`, written into `dir`.
    pub fn kubeconfig(&self, dir: &Path, namespace: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    namespace: {namespace}\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            url = self.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Every object of `plural` in `namespace`.
    pub fn objects(&self, plural: &str, namespace: &str) -> Vec<Value> {
        let store = self.shared.store.lock().unwrap();
        store
            .objects
            .iter()
            .filter(|((p, ns, _), _)| *p == plural && ns == namespace)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Creates `object` (of `plural`) as a client would.
    pub fn create(&self, plural: &str, namespace: &str, object: Value) -> Value {
        let kind = kind_of(plural).expect("a served kind");
        let mut store = self.shared.store.lock().unwrap();
        let result = store.create(kind, namespace, object);
        self.shared.changed.notify_all();
        result.expect("created")
    }

    /// Creates `object`, or replaces the one of its name, as `kubectl apply` would.
    pub fn replace(&self, plural: &str, namespace: &str, mut object: Value) {
        let kind = kind_of(plural).expect("a served kind");
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        self.with_store(|store| {
            let key = (kind.plural, namespace.to_string(), name);
            match store.objects.get(&key).cloned() {
                Some(current) => {
                    object["metadata"] = current["metadata"].clone();
                    object["apiVersion"] = current["apiVersion"].clone();
                    object["kind"] = current["kind"].clone();
                    store.put(kind, object);
                }
                None => {
                    store.create(kind, namespace, object).expect("created");
                }
            }
        });
    }

    /// Deletes an object as a client would (its dependents go too).
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) {
        let kind = kind_of(plural).expect("a served kind");
        let key = (kind.plural, namespace.to_string(), name.to_string());
        self.with_store(|store| store.delete(kind, &key, false, None));
    }

    /// Replaces an object's `status`, as a controller does.
    pub fn set_status(&self, plural: &str, namespace: &str, name: &str, status: Value) {
        let mut store = self.shared.store.lock().unwrap();
        let key = (
            kind_of(plural).unwrap().plural,
            namespace.to_string(),
            name.to_string(),
        );
        if let Some(mut object) = store.objects.get(&key).cloned() {
            object["status"] = status;
            store.put(kind_of(plural).unwrap(), object);
            self.shared.changed.notify_all();
        }
    }

    /// Forgets the watch history: a watch from any resourceVersion before now gets 410 Gone,
    /// as after an etcd compaction.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().unwrap();
        store.compacted = store.rv;
        store.history.clear();
    }

    /// Answers the next `times` requests of `method` (any, if `None`) on `plural` (any, if
    /// `None`) with `status`.
    pub fn inject(
        &self,
        method: Option<&str>,
        plural: Option<&'static str>,
        status: u16,
        times: usize,
    ) {
        let mut store = self.shared.store.lock().unwrap();
        for _ in 0..times {
            store
                .faults
                .push_back((method.map(String::from), plural, status));
        }
    }

    /// The requests served so far, `METHOD plural`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().log.clone()
    }

    /// Runs `change` on the store under its lock, then tells watchers: how the cluster's
    /// controllers ([`crate::fake_cluster`]) read and write, as the API server's own clients.
    pub(crate) fn with_store<R>(&self, change: impl FnOnce(&mut Store) -> R) -> R {
        let result = change(&mut self.shared.store.lock().unwrap());
        self.shared.changed.notify_all();
        result
    }
}

pub(crate) fn kind_of(plural: &str) -> Option<Kind> {
    KINDS.iter().copied().find(|k| k.plural == plural)
}

impl Store {
    /// A copy of every object of `plural`, with its key.
    pub(crate) fn all(&self, plural: &str) -> Vec<(Key, Value)> {
        let all = self.objects.iter().filter(|(k, _)| k.0 == plural);
        all.map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, kind: Kind, object: &Value) {
        self.history.push_back(Change {
            rv: self.rv,
            plural: kind.plural,
            deleted: false,
            object: object.clone(),
        });
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    fn key(kind: Kind, object: &Value) -> Key {
        let meta = &object["metadata"];
        (
            kind.plural,
            meta["namespace"].as_str().unwrap_or("").to_string(),
            meta["name"].as_str().unwrap_or("").to_string(),
        )
    }

    pub(crate) fn create(
        &mut self,
        kind: Kind,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, (u16, Value)> {
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let meta = &mut object["metadata"];
        if meta["name"].as_str().unwrap_or("").is_empty() {
            let Some(prefix) = meta["generateName"].as_str().map(String::from) else {
                return Err(status(422, "Invalid", "name or generateName is required"));
            };
            meta["name"] = json!(format!("{prefix}{}", random_suffix(self.uid + self.rv)));
        }
        if kind.namespaced {
            meta["namespace"] = json!(namespace);
        }
        let key = Store::key(kind, &object);
        if self.objects.contains_key(&key) {
            let message = format!(
                "{}.{} \"{}\" already exists",
                kind.plural, kind.group, key.2
            );
            return Err(status(409, "AlreadyExists", &message));
        }
        self.uid += 1;
        let rv = self.next_rv();
        let meta = &mut object["metadata"];
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uid));
        meta["resourceVersion"] = json!(rv.to_string());
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["generation"] = json!(1);
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind);
        if kind.plural == "pods" && object["status"]["phase"].is_null() {
            object["status"] = json!({"phase": "Pending"});
        }
        if kind.plural == "secrets" {
            merge_string_data(&mut object);
        }
        if kind.plural == "persistentvolumeclaims" {
            // The StorageObjectInUseProtection admission plugin's finalizer; a claim is Pending
            // until the cluster binds it.
            let finalizers = object["metadata"]["finalizers"].as_array().cloned();
            let mut finalizers = finalizers.unwrap_or_default();
            if !finalizers.contains(&json!(PVC_PROTECTION)) {
                finalizers.push(json!(PVC_PROTECTION));
            }
            object["metadata"]["finalizers"] = json!(finalizers);
            object["status"] = json!({"phase": "Pending"});
        }
        self.objects.insert(key, object.clone());
        self.record(kind, &object);
        Ok(object)
    }

    /// A merge patch (RFC 7386; strategic-merge patches are applied the same way: none of the
    /// kinds here needs list merging), or server-side apply: a field another manager owns
    /// with another value is a 409 conflict unless forced, as the API server answers.
    #[allow(clippy::too_many_arguments)]
    fn patch(
        &mut self,
        kind: Kind,
        key: &Key,
        name: &str,
        patch: &Value,
        manager: &str,
        apply: bool,
        force: bool,
    ) -> Result<(u16, Value), (u16, Value)> {
        let current = match self.objects.get(key).cloned() {
            Some(current) => current,
            None if apply => {
                let mut object = patch.clone();
                object["metadata"]["name"] = json!(name);
                let created = self.create(kind, &key.1, object)?;
                let owned = self.owners.entry(key.clone()).or_default();
                for (path, _) in leaves(patch) {
                    owned.insert(path, manager.to_string());
                }
                return Ok((201, created));
            }
            None => return Err(not_found(kind, name)),
        };
        let owned = self.owners.entry(key.clone()).or_default();
        if apply && !force {
            let conflicts: Vec<String> = leaves(patch)
                .into_iter()
                .filter(|(path, value)| {
                    owned.get(path).is_some_and(|owner| owner != manager)
                        && pointer(&current, path) != Some(value)
                })
                .map(|(path, _)| format!("conflict with \"{}\": .{path}", owned[&path]))
                .collect();
            if !conflicts.is_empty() {
                let message = format!(
                    "Apply failed with {} conflict(s): {}",
                    conflicts.len(),
                    conflicts.join(", ")
                );
                return Err(status(409, "Conflict", &message));
            }
        }
        for (path, value) in leaves(patch) {
            match value {
                Value::Null => owned.remove(&path),
                _ => owned.insert(path, manager.to_string()),
            };
        }
        let mut next = current;
        merge_patch(&mut next, patch);
        Ok((200, self.put(kind, next)))
    }

    /// Stores `object` as the new version and tells watchers. An object being deleted whose
    /// last finalizer is gone, with no grace period left (a pod's kubelet has finished with it),
    /// is removed instead, as the API server does on that update.
    pub(crate) fn put(&mut self, kind: Kind, mut object: Value) -> Value {
        if kind.plural == "secrets" {
            merge_string_data(&mut object);
        }
        if released(&object) {
            self.remove(kind, &Store::key(kind, &object));
            return object;
        }
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = Store::key(kind, &object);
        self.objects.insert(key, object.clone());
        self.record(kind, &object);
        object
    }

    pub(crate) fn remove(&mut self, kind: Kind, key: &Key) -> Option<Value> {
        let object = self.objects.remove(key)?;
        self.next_rv();
        let mut gone = object.clone();
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.history.push_back(Change {
            rv: self.rv,
            plural: kind.plural,
            deleted: true,
            object: gone,
        });
        Some(object)
    }

    /// Deletes an object. One with finalizers only gets a deletion timestamp, as does a pod bound
    /// to a node and not yet ended, for `grace` seconds (else its `terminationGracePeriodSeconds`),
    /// whose kubelet stops it and then deletes it for good (`pkg/registry/core/pod/strategy.go`
    /// `CheckGracefulDelete`: an unbound or ended pod has none); a second delete may only shorten
    /// the grace period. What names it as its owner (a Job's pods, a DaemonSet's) goes along
    /// unless orphaning.
    pub(crate) fn delete(
        &mut self,
        kind: Kind,
        key: &Key,
        orphan: bool,
        grace: Option<u64>,
    ) -> Option<Value> {
        let object = self.objects.get(key)?.clone();
        let grace = grace_period(kind, &object, grace);
        let finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if grace > 0 || finalizers {
            return Some(self.mark_deleted(kind, object, grace));
        }
        if !orphan {
            self.delete_dependents(key, &object["metadata"]["uid"]);
        }
        self.remove(kind, key)
    }

    /// The deletion timestamp and grace period of an object that cannot go yet.
    fn mark_deleted(&mut self, kind: Kind, mut object: Value, grace: u64) -> Value {
        let meta = &mut object["metadata"];
        let current = meta["deletionGracePeriodSeconds"].as_u64();
        if meta["deletionTimestamp"].is_null() {
            meta["deletionTimestamp"] = json!(now_rfc3339());
        } else if current.is_some_and(|c| c <= grace) {
            return object;
        }
        meta["deletionGracePeriodSeconds"] = json!(grace);
        self.put(kind, object)
    }

    /// Garbage collection: the pods `owner` owns go with it.
    fn delete_dependents(&mut self, key: &Key, owner: &Value) {
        let pods: Vec<_> = self
            .objects
            .iter()
            .filter(|((p, ns, _), pod)| {
                *p == "pods"
                    && *ns == key.1
                    && pod["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|o| o.iter().any(|r| r["uid"] == *owner))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for pod in pods {
            self.delete(kind_of("pods").unwrap(), &pod, false, None);
        }
    }

    /// Sets a condition in a pod's status as `UpdatePodCondition` does: one of each type, its
    /// `lastTransitionTime` kept while its status stays the same. Whether the pod is there.
    pub(crate) fn set_pod_condition(&mut self, key: &Key, condition: Value) -> bool {
        let Some(mut pod) = self.objects.get(key).cloned() else {
            return false;
        };
        pod["status"]["conditions"] = with_condition(&pod["status"]["conditions"], condition);
        self.put(kind_of("pods").unwrap(), pod);
        true
    }

    /// The Eviction API (`pkg/registry/core/pod/storage/eviction.go` `addConditionAndDeletePod`):
    /// with no PodDisruptionBudget to refuse it, the pod gets `DisruptionTarget` and is deleted
    /// with the eviction's grace period; the answer is a 201 success Status.
    pub(crate) fn evict(
        &mut self,
        key: &Key,
        grace: Option<u64>,
    ) -> Result<(u16, Value), (u16, Value)> {
        let pods = kind_of("pods").unwrap();
        let condition = disruption("EvictionByEvictionAPI", "Eviction API: evicting");
        if !self.set_pod_condition(key, condition) {
            return Err(not_found(pods, &key.2));
        }
        self.delete(pods, key, false, grace);
        let success = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Success", "code": 201});
        Ok((201, success))
    }
}

/// Whether an object being deleted can go: no finalizer left, no grace period left.
fn released(object: &Value) -> bool {
    let meta = &object["metadata"];
    !meta["deletionTimestamp"].is_null()
        && meta["finalizers"].as_array().is_none_or(|f| f.is_empty())
        && meta["deletionGracePeriodSeconds"].as_u64().unwrap_or(0) == 0
}

/// A delete's grace period: only a pod bound to a node and not ended has one.
fn grace_period(kind: Kind, object: &Value, requested: Option<u64>) -> u64 {
    let ended = matches!(
        object["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    );
    if kind.plural != "pods" || !object["spec"]["nodeName"].is_string() || ended {
        return 0;
    }
    let own = object["spec"]["terminationGracePeriodSeconds"].as_u64();
    requested.or(own).unwrap_or(30)
}

/// A `DisruptionTarget=True` pod condition, as the disruption's controller sets it.
pub(crate) fn disruption(reason: &str, message: &str) -> Value {
    json!({"type": "DisruptionTarget", "status": "True", "reason": reason, "message": message,
        "lastTransitionTime": now_rfc3339()})
}

/// `conditions` with `condition` set in place of the one of its type.
pub(crate) fn with_condition(conditions: &Value, mut condition: Value) -> Value {
    let mut list = conditions.as_array().cloned().unwrap_or_default();
    match list.iter().position(|c| c["type"] == condition["type"]) {
        Some(i) => {
            if list[i]["status"] == condition["status"] {
                condition["lastTransitionTime"] = list[i]["lastTransitionTime"].clone();
            }
            list[i] = condition;
        }
        None => list.push(condition),
    }
    json!(list)
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// The `reason` the real API server gives with each status an injected fault can carry
/// (apimachinery `pkg/apis/meta/v1/types.go` `StatusReason*`); clients such as kube-core 5.0.0's
/// `Status::is_forbidden` go by the reason, not the code.
fn fault_reason(code: u16) -> &'static str {
    match code {
        403 => "Forbidden",
        409 => "Conflict",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        _ => "",
    }
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Five characters from the alphabet Kubernetes uses for generated names.
pub(crate) fn random_suffix(seed: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = seed
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    (0..5)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

/// One connection's requests.
fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    serve_connection(stream, |request, out| handle(request, shared, out))
}

fn query(request: &Request) -> BTreeMap<String, String> {
    request
        .query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

fn respond(out: &mut TcpStream, code: u16, body: &Value, extra: &str) -> std::io::Result<bool> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        403 => "Forbidden",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        410 => "Gone",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        _ => "Error",
    };
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{text}",
        text.len()
    )?;
    Ok(true)
}

/// Serves one request; whether the connection may serve another.
fn handle(request: &Request, shared: &Shared, out: &mut TcpStream) -> std::io::Result<bool> {
    let path = request.path.trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Discovery.
    match segments.as_slice() {
        ["version"] => {
            return respond(
                out,
                200,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"}),
                "",
            );
        }
        ["api"] => {
            return respond(
                out,
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
                "",
            );
        }
        ["apis"] => {
            let mut named: Vec<Kind> = KINDS.to_vec();
            named.retain(|k| !k.group.is_empty());
            named.sort_by_key(|k| k.group);
            // One entry a group, however many of its kinds are served.
            named.dedup_by_key(|k| k.group);
            let groups: Vec<Value> = named
                .iter()
                .map(|k| {
                    let gv = json!({"groupVersion": k.api_version(), "version": k.version});
                    json!({"name": k.group, "versions": [gv], "preferredVersion": gv})
                })
                .collect();
            return respond(
                out,
                200,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
                "",
            );
        }
        ["api", version] | ["apis", _, version] => {
            let group = if segments[0] == "api" {
                ""
            } else {
                segments[1]
            };
            let mut resources: Vec<Value> = KINDS
                .iter()
                .filter(|k| k.group == group && k.version == *version)
                .flat_map(|k| {
                    let verbs = ["create", "delete", "get", "list", "patch", "update", "watch"];
                    [
                        json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced, "kind": k.kind, "verbs": verbs, "shortNames": short_names(k.plural)}),
                        json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"]}),
                    ]
                })
                .collect();
            if group.is_empty() {
                // The subresource `kubectl drain` looks for before it evicts rather than deletes
                // (k8s.io/kubectl `pkg/drain` `CheckEvictionSupport`).
                resources.push(
                    json!({"name": "pods/eviction", "singularName": "", "namespaced": true,
                    "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]}),
                );
            }
            let gv = if group.is_empty() {
                version.to_string()
            } else {
                format!("{group}/{version}")
            };
            return respond(
                out,
                200,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
                "",
            );
        }
        _ => {}
    }
    // Resources: /api/v1/[namespaces/NS/]PLURAL[/NAME[/status]], the same under /apis/G/V.
    let rest: &[&str] = match segments.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => {
            let message = format!(
                "the server could not find the requested resource ({} {})",
                request.method, request.path
            );
            let (code, body) = status(404, "NotFound", &message);
            return respond(out, code, &body, "");
        }
    };
    // Namespaces: every one exists (the fake has no admission to refuse a missing one).
    if let (["namespaces", ns], "GET") = (rest, request.method.as_str()) {
        let namespace = json!({"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": ns, "uid": format!("ns-{ns}"), "resourceVersion": "1"},
            "status": {"phase": "Active"}});
        return respond(out, 200, &namespace, "");
    }
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(*sub)),
        _ => ("", None, None),
    };
    let Some(kind) = kind_of(plural) else {
        let message = format!(
            "the server could not find the requested resource ({} {})",
            request.method, request.path
        );
        let (code, body) = status(404, "NotFound", &message);
        return respond(out, code, &body, "");
    };
    let params = query(request);
    let mut store = shared.store.lock().unwrap();
    store.log.push(format!("{} {}", request.method, plural));
    let fault = store.faults.iter().position(|(m, p, _)| {
        m.as_deref().is_none_or(|m| m == request.method) && p.is_none_or(|p| p == plural)
    });
    if let Some(i) = fault {
        let (_, _, code) = store.faults.remove(i).unwrap();
        drop(store);
        let (code, body) = status(code, fault_reason(code), &format!("injected fault {code}"));
        let extra = if code == 429 {
            "Retry-After: 1\r\n"
        } else {
            ""
        };
        return respond(out, code, &body, extra);
    }
    let ns = namespace.clone().unwrap_or_default();
    let key = (kind.plural, ns.clone(), name.clone().unwrap_or_default());
    let body = match request.header("Content-Type") {
        Some(t) if t.contains("protobuf") => match crate::fake_kube_protobuf::decode(&request.body)
        {
            Ok(object) if object["kind"] == "Job" => with_cronjob_spec(&store, &ns, object),
            Ok(object) => object,
            Err(why) => {
                drop(store);
                let (code, body) = status(415, "UnsupportedMediaType", &why);
                return respond(out, code, &body, "");
            }
        },
        _ => serde_json::from_slice(&request.body).unwrap_or(Value::Null),
    };
    let result: Result<(u16, Value), (u16, Value)> = match (request.method.as_str(), &name) {
        ("GET", None) if params.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            drop(store);
            return watch(kind, namespace.as_deref(), &params, shared, out);
        }
        ("GET", None) => {
            let limit = params
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            // Later pages come from the list as it was at the first page, as the real server
            // reads them at the first page's resourceVersion; a snapshot older than the
            // watch history has expired, as a compacted etcd revision has.
            let snapshot = match params.get("continue") {
                None => Some((
                    store.rv,
                    store
                        .objects
                        .iter()
                        .filter(|((p, n, _), o)| {
                            *p == kind.plural
                                && namespace.as_ref().is_none_or(|ns| ns == n)
                                && matches(o, &params)
                        })
                        .map(|(_, o)| o.clone())
                        .collect::<VecDeque<_>>(),
                )),
                Some(token) => token
                    .parse()
                    .ok()
                    .and_then(|id| store.pages.remove(&id))
                    .filter(|(rv, _)| *rv >= store.compacted),
            };
            match snapshot {
                None => Err(status(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                )),
                Some((rv, mut rest)) => {
                    let items: Vec<Value> = rest.drain(..limit.min(rest.len())).collect();
                    let mut metadata = json!({"resourceVersion": rv.to_string()});
                    if !rest.is_empty() {
                        store.uid += 1;
                        let id = store.uid;
                        store.pages.insert(id, (rv, rest));
                        metadata["continue"] = json!(id.to_string());
                    }
                    Ok((
                        200,
                        json!({"kind": format!("{}List", kind.kind), "apiVersion": kind.api_version(),
                        "metadata": metadata, "items": items}),
                    ))
                }
            }
        }
        ("GET", Some(n)) => match store.objects.get(&key) {
            Some(o) => Ok((200, o.clone())),
            None => Err(not_found(kind, n)),
        },
        ("POST", None) => store.create(kind, &ns, body).map(|o| (201, o)),
        ("POST", Some(n)) if kind.plural == "pods" && subresource == Some("eviction") => {
            eviction(&mut store, &key, n, &params, &body)
        }
        ("PUT", Some(n)) => match store.objects.get(&key).cloned() {
            None => Err(not_found(kind, n)),
            Some(current) => {
                let stale = body["metadata"]["resourceVersion"]
                    .as_str()
                    .is_some_and(|rv| Some(rv) != current["metadata"]["resourceVersion"].as_str());
                if stale {
                    Err(status(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{n}\": the object has been modified; please apply your changes to the latest version and try again", kind.plural)))
                } else {
                    let mut next = match subresource {
                        Some("status") => {
                            let mut next = current.clone();
                            next["status"] = body["status"].clone();
                            next
                        }
                        _ => {
                            let mut next = body;
                            next["status"] = current["status"].clone();
                            next
                        }
                    };
                    next["metadata"]["uid"] = current["metadata"]["uid"].clone();
                    next["metadata"]["creationTimestamp"] =
                        current["metadata"]["creationTimestamp"].clone();
                    next["metadata"]["namespace"] = json!(ns);
                    next["apiVersion"] = json!(kind.api_version());
                    next["kind"] = json!(kind.kind);
                    Ok((200, store.put(kind, next)))
                }
            }
        },
        ("PATCH", Some(n)) => {
            let manager = params
                .get("fieldManager")
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            let apply = request
                .header("Content-Type")
                .is_some_and(|t| t.starts_with("application/apply-patch"));
            let force = params.get("force").is_some_and(|f| f == "true");
            store.patch(kind, &key, n, &body, &manager, apply, force)
        }
        ("DELETE", Some(n)) => {
            let orphan = params
                .get("propagationPolicy")
                .is_some_and(|p| p == "Orphan")
                || body["propagationPolicy"] == "Orphan";
            let grace = grace_requested(&params, &body);
            match store.delete(kind, &key, orphan, grace) {
                Some(o) => Ok((200, o)),
                None => Err(not_found(kind, n)),
            }
        }
        _ => Err(status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    };
    drop(store);
    shared.changed.notify_all();
    match result {
        Ok((code, body)) | Err((code, body)) => respond(out, code, &body, ""),
    }
}

/// `POST …/pods/<name>/eviction` with a policy/v1 Eviction.
fn eviction(
    store: &mut Store,
    key: &Key,
    name: &str,
    params: &BTreeMap<String, String>,
    body: &Value,
) -> Result<(u16, Value), (u16, Value)> {
    if body["metadata"]["name"].as_str().is_some_and(|b| b != name) {
        let message = "name in URL does not match name in Eviction object";
        return Err(status(400, "BadRequest", message));
    }
    store.evict(key, grace_requested(params, &body["deleteOptions"]))
}

/// The grace period a delete asks for: `gracePeriodSeconds` in the query or the DeleteOptions.
fn grace_requested(params: &BTreeMap<String, String>, options: &Value) -> Option<u64> {
    let query = params
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse().ok());
    query.or_else(|| options["gracePeriodSeconds"].as_u64())
}

/// A Job `kubectl create job --from=cronjob/NAME` sent as protobuf: its spec is the CronJob's
/// job template's, which kubectl copies as it is ([`crate::fake_kube_protobuf`]).
fn with_cronjob_spec(store: &Store, namespace: &str, mut job: Value) -> Value {
    let owner = &job["metadata"]["ownerReferences"][0];
    let key = (
        "cronjobs",
        namespace.to_string(),
        owner["name"].as_str().unwrap_or("").to_string(),
    );
    if let Some(cronjob) = store.objects.get(&key) {
        job["spec"] = cronjob["spec"]["jobTemplate"]["spec"].clone();
    }
    job
}

/// The short names discovery gives, which `kubectl get pvc` resolves through.
fn short_names(plural: &str) -> &'static [&'static str] {
    match plural {
        "persistentvolumeclaims" => &["pvc"],
        "volumesnapshots" => &["vs"],
        "pods" => &["po"],
        "events" => &["ev"],
        "nodes" => &["no"],
        "namespaces" => &["ns"],
        "serviceaccounts" => &["sa"],
        "deployments" => &["deploy"],
        "cronjobs" => &["cj"],
        _ => &[],
    }
}

fn not_found(kind: Kind, name: &str) -> (u16, Value) {
    let group = if kind.group.is_empty() {
        String::new()
    } else {
        format!(".{}", kind.group)
    };
    status(
        404,
        "NotFound",
        &format!("{}{group} \"{name}\" not found", kind.plural),
    )
}

/// The leaf fields a patch sets, as dotted paths (`spec.holderIdentity`), with their values;
/// arrays count as one field. The object's identity is no one's field.
fn leaves(patch: &Value) -> Vec<(String, Value)> {
    fn walk(value: &Value, prefix: String, out: &mut Vec<(String, Value)>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(v, path, out);
                }
            }
            other => out.push((prefix, other.clone())),
        }
    }
    let mut out = Vec::new();
    walk(patch, String::new(), &mut out);
    out.retain(|(path, _)| {
        !matches!(
            path.as_str(),
            "apiVersion" | "kind" | "metadata.name" | "metadata.namespace"
        )
    });
    out
}

/// The value at a dotted path.
fn pointer<'v>(object: &'v Value, path: &str) -> Option<&'v Value> {
    object.pointer(&format!("/{}", path.replace('.', "/")))
}

/// RFC 7386: objects merge, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Whether `object` passes the request's label and field selectors.
fn matches(object: &Value, params: &BTreeMap<String, String>) -> bool {
    let labels = &object["metadata"]["labels"];
    let label = |k: &str| labels[k].as_str().map(String::from);
    let labels_ok = params.get("labelSelector").is_none_or(|selector| {
        split_selector(selector).iter().all(|term| {
            let term = term.trim();
            if let Some((k, set)) = term.split_once(" in ") {
                let set = set.trim().trim_start_matches('(').trim_end_matches(')');
                return label(k.trim()).is_some_and(|v| set.split(',').any(|s| s.trim() == v));
            }
            if let Some((k, set)) = term.split_once(" notin ") {
                let set = set.trim().trim_start_matches('(').trim_end_matches(')');
                return label(k.trim()).is_none_or(|v| set.split(',').all(|s| s.trim() != v));
            }
            if let Some((k, v)) = term.split_once("!=") {
                return label(k.trim()).as_deref() != Some(v.trim());
            }
            if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                return label(k.trim()).as_deref() == Some(v.trim());
            }
            if let Some(k) = term.strip_prefix('!') {
                return label(k.trim()).is_none();
            }
            term.is_empty() || label(term).is_some()
        })
    });
    let fields_ok = params.get("fieldSelector").is_none_or(|selector| {
        selector.split(',').filter(|t| !t.is_empty()).all(|term| {
            let field = |path: &str| {
                let mut v = object;
                for part in path.trim().split('.') {
                    v = &v[part];
                }
                v.as_str().map(String::from).unwrap_or_else(|| match v {
                    Value::Null => String::new(),
                    other => other.to_string(),
                })
            };
            match term.split_once("!=") {
                Some((path, value)) => field(path) != value.trim(),
                None => {
                    let (path, value) = term
                        .split_once("==")
                        .or_else(|| term.split_once('='))
                        .unwrap_or((term, ""));
                    field(path) == value.trim()
                }
            }
        })
    });
    labels_ok && fields_ok
}

/// Splits a label selector on the commas between terms, not those inside `in (a,b)`.
fn split_selector(selector: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    terms.push(current);
    terms
}

/// A watch: chunked JSON events, one per line, until the timeout or the client goes.
fn watch(
    kind: Kind,
    namespace: Option<&str>,
    params: &BTreeMap<String, String>,
    shared: &Shared,
    out: &mut TcpStream,
) -> std::io::Result<bool> {
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let deadline = Instant::now() + timeout;
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let send = |out: &mut TcpStream, event: Value| -> std::io::Result<()> {
        let line = format!("{event}\n");
        write!(out, "{:x}\r\n{line}\r\n", line.len())?;
        out.flush()
    };
    let in_scope = |plural: &str, object: &Value| {
        plural == kind.plural
            && namespace.is_none_or(|ns| object["metadata"]["namespace"] == ns)
            && matches(object, params)
    };
    let requested: Option<u64> = params
        .get("resourceVersion")
        .filter(|rv| !rv.is_empty() && *rv != "0")
        .and_then(|rv| rv.parse().ok());
    let mut seen;
    {
        let store = shared.store.lock().unwrap();
        match requested {
            Some(rv) if rv < store.compacted => {
                let (_, status) = status(
                    410,
                    "Expired",
                    &format!("too old resource version: {rv} ({})", store.compacted),
                );
                drop(store);
                send(out, json!({"type": "ERROR", "object": status}))?;
                write!(out, "0\r\n\r\n")?;
                return Ok(true);
            }
            Some(rv) => seen = rv,
            None => {
                // Unset or 0: the current state as ADDED events, then changes.
                let current: Vec<Value> = store
                    .objects
                    .iter()
                    .filter(|((p, _, _), o)| in_scope(p, o))
                    .map(|(_, o)| o.clone())
                    .collect();
                seen = store.rv;
                drop(store);
                for object in current {
                    send(out, json!({"type": "ADDED", "object": object}))?;
                }
            }
        }
    }
    // Which objects this watcher already knows, to tell ADDED from MODIFIED.
    let mut known: std::collections::HashSet<String> = {
        let store = shared.store.lock().unwrap();
        store
            .objects
            .iter()
            .filter(|((p, _, _), o)| in_scope(p, o))
            .filter(|(_, o)| {
                o["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|rv| rv.parse::<u64>().ok())
                    .is_some_and(|rv| rv <= seen)
            })
            .map(|(_, o)| o["metadata"]["uid"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let mut last_sent = Instant::now();
    loop {
        let now = Instant::now();
        if now >= deadline {
            write!(out, "0\r\n\r\n")?;
            return Ok(true);
        }
        let (changes, rv, expired) = {
            let store = shared.store.lock().unwrap();
            let wait = deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(500));
            let store = if store.rv == seen {
                shared.changed.wait_timeout(store, wait).unwrap().0
            } else {
                store
            };
            let changes: Vec<Change> = store
                .history
                .iter()
                .filter(|c| c.rv > seen)
                .cloned()
                .collect();
            (changes, store.rv, seen < store.compacted)
        };
        if expired {
            let (_, status) = status(410, "Expired", "too old resource version");
            send(out, json!({"type": "ERROR", "object": status}))?;
            write!(out, "0\r\n\r\n")?;
            return Ok(true);
        }
        for change in &changes {
            seen = seen.max(change.rv);
            if change.plural != kind.plural {
                continue;
            }
            let uid = change.object["metadata"]["uid"]
                .as_str()
                .unwrap_or("")
                .to_string();
            // An object that leaves the selection is DELETED for this watcher, one that enters
            // it ADDED, as the API server does.
            let event_type = match (change.deleted, in_scope(change.plural, &change.object)) {
                (true, _) | (false, false) => {
                    if !known.remove(&uid) {
                        continue;
                    }
                    "DELETED"
                }
                (false, true) if known.insert(uid) => "ADDED",
                (false, true) => "MODIFIED",
            };
            send(out, json!({"type": event_type, "object": change.object}))?;
            last_sent = Instant::now();
        }
        seen = seen.max(rv);
        if bookmarks && last_sent.elapsed() >= Duration::from_secs(1) {
            send(
                out,
                json!({"type": "BOOKMARK", "object": {"kind": kind.kind, "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": seen.to_string()}}}),
            )?;
            last_sent = Instant::now();
        }
    }
}
