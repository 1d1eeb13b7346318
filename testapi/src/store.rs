//! The object store: JSON objects by resource, namespace and name, one global resourceVersion
//! counter, an event history for watches that resume, and Kubernetes' write semantics (status
//! subresource isolation, generation, finalizers and deletionTimestamp, owner-reference garbage
//! collection, optimistic concurrency).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::resources::ResourceDef;

/// Events kept for watches that resume from an older resourceVersion.
const HISTORY: usize = 20_000;

/// A watch event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Clone, Debug)]
pub struct WatchEvent {
    /// The resourceVersion of the change.
    pub rv: u64,
    /// `plural.group` of the object.
    pub resource: String,
    /// The object's namespace (empty for cluster-scoped).
    pub namespace: String,
    /// What happened.
    pub kind: EventType,
    /// The object after the change (before, for deletions).
    pub object: Value,
}

/// Where a watch starts.
#[derive(Debug)]
pub enum WatchStart {
    /// Every current object, as `(resource, namespace, object)`, sent as ADDED.
    Fresh(Vec<(String, String, Value)>),
    /// The changes after the requested resourceVersion.
    Resume(Vec<WatchEvent>),
    /// The requested resourceVersion is older than the history: 410 Gone.
    Gone,
}

/// An error the API answers with a `Status` object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub code: u16,
    /// Kubernetes reason, e.g. `NotFound`.
    pub reason: &'static str,
    /// Human message.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn not_found(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{}.{} \"{name}\" not found", def.plural, def.group),
        )
    }

    /// The `Status` body.
    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        })
    }
}

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Everything but `.status` (when the resource has a status subresource).
    Main,
    /// Only `.status`.
    Status,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    resource: String,
    namespace: String,
    name: String,
}

impl Key {
    /// The key of an object; cluster-scoped objects have no namespace whatever the path said.
    fn new(def: &ResourceDef, namespace: &str, name: &str) -> Self {
        Self {
            resource: resource_key(def),
            namespace: if def.namespaced {
                namespace.into()
            } else {
                String::new()
            },
            name: name.into(),
        }
    }
}

struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<WatchEvent>,
    uid: u64,
}

/// The store.
pub struct Store {
    state: Mutex<State>,
    events: broadcast::Sender<WatchEvent>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Default for Store {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                uid: 0,
            }),
            events: broadcast::channel(HISTORY).0,
        }
    }
}

/// `plural.group`, the key of a resource type.
pub fn resource_key(def: &ResourceDef) -> String {
    format!("{}.{}", def.plural, def.group)
}

/// The current time as Kubernetes writes it (RFC 3339, seconds).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn meta_str<'v>(obj: &'v Value, field: &str) -> Option<&'v str> {
    obj.get("metadata")?.get(field)?.as_str()
}

impl State {
    fn record(
        &mut self,
        events: &broadcast::Sender<WatchEvent>,
        resource: &str,
        ns: &str,
        kind: EventType,
        object: Value,
    ) {
        let event = WatchEvent {
            rv: self.rv,
            resource: resource.to_owned(),
            namespace: ns.to_owned(),
            kind,
            object,
        };
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(event.clone());
        let _ = events.send(event);
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }
}

impl Store {
    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Objects of `def` (in `namespace`, or all) that `keep` accepts, and the list's
    /// resourceVersion.
    pub fn list(
        &self,
        def: &ResourceDef,
        namespace: Option<&str>,
        keep: impl Fn(&Value) -> bool,
    ) -> (Vec<Value>, u64) {
        let state = self.lock();
        let resource = resource_key(def);
        let items = state
            .objects
            .iter()
            .filter(|(k, _)| k.resource == resource && namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, v)| v)
            .filter(|v| keep(v))
            .cloned()
            .collect();
        (items, state.rv)
    }

    /// One object.
    pub fn get(&self, def: &ResourceDef, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let key = Key::new(def, namespace, name);
        self.lock()
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))
    }

    /// Subscribes to changes. Atomically with the subscription, returns where the watch starts:
    /// the history after `since`, or every current object when no resourceVersion was given.
    pub fn watch(&self, since: Option<u64>) -> (broadcast::Receiver<WatchEvent>, WatchStart) {
        let state = self.lock();
        let rx = self.events.subscribe();
        let start = match since {
            None => WatchStart::Fresh(
                state
                    .objects
                    .iter()
                    .map(|(k, v)| (k.resource.clone(), k.namespace.clone(), v.clone()))
                    .collect(),
            ),
            Some(since) => {
                let oldest = state.history.front().map_or(state.rv + 1, |e| e.rv);
                if since + 1 < oldest && since < state.rv {
                    WatchStart::Gone
                } else {
                    WatchStart::Resume(
                        state
                            .history
                            .iter()
                            .filter(|e| e.rv > since)
                            .cloned()
                            .collect(),
                    )
                }
            }
        };
        (rx, start)
    }

    /// Creates an object.
    pub fn create(
        &self,
        def: &ResourceDef,
        namespace: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        if !obj.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the body is not an object",
            ));
        }
        let mut name = meta_str(&obj, "name").unwrap_or("").to_owned();
        if name.is_empty() {
            if let Some(prefix) = meta_str(&obj, "generateName") {
                state.uid += 1;
                name = format!("{prefix}{:05x}", state.uid);
            } else {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!("{} is invalid: metadata.name: Required value", def.kind),
                ));
            }
        }
        let key = Key::new(def, namespace, &name);
        if state.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{}.{} \"{name}\" already exists", def.plural, def.group),
            ));
        }
        state.uid += 1;
        let rv = state.next_rv();
        obj["apiVersion"] = json!(def.api_version());
        obj["kind"] = json!(def.kind);
        let meta = obj
            .as_object_mut()
            .map(|o| o.entry("metadata").or_insert_with(|| json!({})))
            .ok_or_else(|| ApiError::new(400, "BadRequest", "no metadata"))?;
        meta["name"] = json!(name);
        if def.namespaced {
            meta["namespace"] = json!(namespace);
        }
        meta["uid"] = json!(format!("00000000-0000-0000-0000-{:012x}", state.uid));
        meta["resourceVersion"] = json!(rv.to_string());
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        state.objects.insert(key.clone(), obj.clone());
        state.record(
            &self.events,
            &key.resource,
            &key.namespace,
            EventType::Added,
            obj.clone(),
        );
        Ok(obj)
    }

    /// Changes an object with `change`, which gets a copy of it. Keeps what `part` may not
    /// change, checks a given resourceVersion, bumps generation on spec changes, and completes a
    /// deletion whose finalizers are gone.
    pub fn update(
        &self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        part: Part,
        change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        let key = Key::new(def, namespace, name);
        let old = state
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))?;
        let mut new = old.clone();
        change(&mut new)?;
        if !new.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the result is not an object",
            ));
        }
        if let Some(rv) = meta_str(&new, "resourceVersion") {
            if rv != meta_str(&old, "resourceVersion").unwrap_or("") {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!("Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", def.plural, def.group),
                ));
            }
        }
        // What this write may not touch comes from the stored object.
        match part {
            Part::Status => {
                let status = new.get("status").cloned();
                new = old.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            Part::Main if def.status => match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            },
            Part::Main => {}
        }
        for field in [
            "uid",
            "creationTimestamp",
            "name",
            "namespace",
            "deletionTimestamp",
            "generation",
        ] {
            match old["metadata"].get(field) {
                Some(v) => new["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        new["apiVersion"] = json!(def.api_version());
        new["kind"] = json!(def.kind);
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        let spec_changed = {
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(o) = v.as_object_mut() {
                    o.remove("metadata");
                    o.remove("status");
                }
                v
            };
            strip(&old) != strip(&new)
        };
        if spec_changed {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            new["metadata"]["generation"] = json!(generation);
        }
        if new == old {
            return Ok(old);
        }
        let rv = state.next_rv();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        let finalizers_empty = new["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if new["metadata"].get("deletionTimestamp").is_some() && finalizers_empty {
            self.remove(&mut state, &key, &new);
            return Ok(new);
        }
        state.objects.insert(key.clone(), new.clone());
        state.record(
            &self.events,
            &key.resource,
            &key.namespace,
            EventType::Modified,
            new.clone(),
        );
        Ok(new)
    }

    /// Deletes an object, or marks it for deletion while it has finalizers.
    pub fn delete(
        &self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        let key = Key::new(def, namespace, name);
        let mut obj = state
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))?;
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        let rv = state.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if has_finalizers {
            if obj["metadata"].get("deletionTimestamp").is_none() {
                obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                state.objects.insert(key.clone(), obj.clone());
                state.record(
                    &self.events,
                    &key.resource,
                    &key.namespace,
                    EventType::Modified,
                    obj.clone(),
                );
            }
            return Ok(obj);
        }
        self.remove(&mut state, &key, &obj);
        Ok(obj)
    }

    /// Removes an object for good: records the deletion and deletes what it owned.
    fn remove(&self, state: &mut State, key: &Key, obj: &Value) {
        state.objects.remove(key);
        state.record(
            &self.events,
            &key.resource,
            &key.namespace,
            EventType::Deleted,
            obj.clone(),
        );
        self.collect_garbage(state, obj);
    }

    /// Deletes objects owned by `owner` (background cascading deletion).
    fn collect_garbage(&self, state: &mut State, owner: &Value) {
        let Some(uid) = meta_str(owner, "uid").map(str::to_owned) else {
            return;
        };
        let owned: Vec<Key> = state
            .objects
            .iter()
            .filter(|(_, v)| {
                v["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| {
                        refs.iter().any(|r| r["uid"].as_str() == Some(uid.as_str()))
                    })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in owned {
            if let Some(mut obj) = state.objects.get(&key).cloned() {
                let rv = state.next_rv();
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                self.remove(state, &key, &obj);
            }
        }
    }
}
