//! The anytime-sync handshake over a sharded fleet (hosts each serving one shard of a version).
//!
//! Per request: read every host's (version, shard, shard count) from the metadata cache (stale
//! entries asked afresh, concurrently); choose a version V for which every shard has a live
//! replica serving V (requests take turns over the covering versions in proportion to their
//! capacity, the fewest replicas a version has on any shard); embed once with V;
//! search one replica per shard in parallel, each asked for V; merge the top k. A replica that
//! refuses V (it flipped) or fails is replaced by another replica of that shard on V; a shard
//! left without one makes the request redo the handshake. All under the request's deadline. No
//! version with full coverage means a clear error, never a partial or mixed answer.
//!
//! The naive mode (a measurement for `tandem sim`, never for production) embeds with the user
//! tower's newest version and fans out to one live replica per shard whatever it serves; the
//! answer reports a shard version that differs from the embedding's, if any did.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use tandem_telemetry::catalogue as m;
use tandem_types::ModelVersion;

use super::{
    Ask, Attempt, Candidates, Embedded, Handshake, HomefeedError, Host, Orchestrator, Probe,
    Searched,
};

/// What one host serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct View {
    pub version: ModelVersion,
    pub shard: u32,
    pub shards: u32,
}

/// The version chosen and, per shard, the replicas serving it (in the order to try them).
struct Plan {
    version: ModelVersion,
    replicas: Vec<Vec<usize>>,
}

/// The version to use given every host's view: full coverage required; `turn` spreads
/// requests over the covering versions by capacity and over each shard's replicas.
fn choose(
    views: &[Option<View>],
    skip: &HashSet<ModelVersion>,
    turn: usize,
) -> Result<Plan, String> {
    // (version, shard count) → replicas per shard.
    let mut groups: BTreeMap<(ModelVersion, u32), Vec<Vec<usize>>> = BTreeMap::new();
    for (h, v) in views.iter().enumerate() {
        let Some(v) = v else { continue };
        if skip.contains(&v.version) || v.shard >= v.shards {
            continue;
        }
        let g = groups
            .entry((v.version, v.shards))
            .or_insert_with(|| vec![Vec::new(); v.shards as usize]);
        g[v.shard as usize].push(h);
    }
    // Versions covering every shard, each weighted by its capacity (its fewest replicas on any
    // shard): requests take turns over them in that proportion, so traffic splits over the
    // versions of a partial rollout as it does over whole-index hosts — a canary of one
    // replica per shard gets its share.
    let covered: Vec<_> = groups
        .iter()
        .filter(|(_, per)| per.iter().all(|r| !r.is_empty()))
        .map(|(key, per)| (key, per, per.iter().map(Vec::len).min().unwrap_or(0)))
        .collect();
    let total: usize = covered.iter().map(|c| c.2).sum();
    let mut slot = if total == 0 { 0 } else { turn % total };
    let chosen = covered.into_iter().find(|c| {
        if slot < c.2 {
            true
        } else {
            slot -= c.2;
            false
        }
    });
    match chosen.map(|(key, per, _)| (key, per)) {
        Some(((version, _), per)) => Ok(Plan {
            version: *version,
            replicas: per
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    let n = r.len();
                    r.rotate_left(turn % n);
                    r
                })
                .collect(),
        }),
        None => Err(format!(
            "no version has a live replica on every shard (fleet: {})",
            describe(&groups)
        )),
    }
}

fn describe(groups: &BTreeMap<(ModelVersion, u32), Vec<Vec<usize>>>) -> String {
    if groups.is_empty() {
        return "no host answered".into();
    }
    groups
        .iter()
        .map(|((v, n), per)| {
            let live: Vec<String> = per.iter().map(|r| r.len().to_string()).collect();
            format!(
                "{v} over {n} shards, replicas per shard [{}]",
                live.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The shards' answers merged: seen items dropped, best first (ties by id), the top `k`.
fn merge(mut items: Vec<(String, f32)>, seen: &HashSet<String>, k: i32) -> Vec<(String, f32)> {
    items.retain(|(id, _)| !seen.contains(id));
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    items.dedup_by(|a, b| a.0 == b.0);
    items.truncate(k as usize);
    items
}

/// Every shard's Search (each leaves the seen items out and answers k) and the seen items, which
/// the merge drops too.
fn probe(embedded: &Embedded<'_>, ask: &Ask<'_>) -> (Probe, HashSet<String>) {
    let exclude = if ask.exclude_seen {
        embedded.history.clone()
    } else {
        Vec::new()
    };
    let seen = exclude.iter().cloned().collect();
    let probe = Probe {
        vector: embedded.vector.clone(),
        k: ask.k,
        exclude,
    };
    (probe, seen)
}

/// How one shard's search ended.
enum ShardAnswer {
    /// The version that answered and its items.
    Items(ModelVersion, Vec<(String, f32)>),
    /// Every replica of the shard refused or failed: redo the handshake.
    Lost(String),
}

impl Orchestrator {
    /// Every host's view, from the cache while fresh; stale ones asked concurrently.
    async fn views(&self, deadline: Instant) -> Vec<Option<View>> {
        let asks = self.hosts.iter().map(|h| async move {
            if let Some(v) = h.view(self.cfg.metadata_ttl) {
                return Some(v);
            }
            self.fetch_version(h, deadline).await.ok()?;
            h.view(self.cfg.metadata_ttl)
        });
        futures_util::future::join_all(asks).await
    }

    /// Whether the fleet serves shards: known once any host said so; otherwise every host is
    /// asked once (a fleet where every reachable host serves a whole index is not sharded).
    pub(super) async fn is_sharded(&self, deadline: Instant) -> bool {
        match self.sharded.load(Ordering::Relaxed) {
            SHARDED => true,
            WHOLE => false,
            _ => {
                let views = self.views(deadline).await;
                if views.iter().flatten().any(|v| v.shards > 1) {
                    true
                } else {
                    if views.iter().any(Option::is_some) {
                        self.sharded.store(WHOLE, Ordering::Relaxed);
                    }
                    false
                }
            }
        }
    }

    pub(super) async fn pick_and_ask_sharded(
        &self,
        ask: &Ask<'_>,
        deadline: Instant,
    ) -> Result<Candidates, HomefeedError> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let mut skip = HashSet::new();
        let mut reasons = Vec::new();
        let mut attempts = 0;
        while attempts < 3 {
            attempts += 1;
            if Instant::now() >= deadline {
                return Err(HomefeedError::DeadlineExceeded);
            }
            let views = self.views(deadline).await;
            let plan = match choose(&views, &skip, turn) {
                Ok(p) => p,
                Err(why) => {
                    reasons.push(why);
                    break;
                }
            };
            let first = &self.hosts[plan.replicas[0][0]];
            let hs = Handshake {
                host: first,
                version: plan.version,
                allow_mismatch: false,
            };
            let embedded = match self.embed(hs, ask, deadline).await {
                Ok(e) => e,
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::NextHost(why)) => {
                    // The user tower lacks V: another covered version may do.
                    reasons.push(why);
                    skip.insert(plan.version);
                    continue;
                }
            };
            if let Some(hook) = &self.cfg.between_embed_and_search {
                hook(first.url()).await;
            }
            let (probe, seen) = probe(&embedded, ask);
            let searches = plan
                .replicas
                .iter()
                .map(|replicas| self.search_shard(replicas, plan.version, false, &probe, deadline));
            let answers = futures_util::future::join_all(searches).await;
            let mut merged = Vec::new();
            let mut hosts = Vec::new();
            let mut lost = None;
            for a in answers {
                match a {
                    Ok((ShardAnswer::Items(_, items), host)) => {
                        merged.extend(items);
                        hosts.push(host);
                    }
                    Ok((ShardAnswer::Lost(why), _)) => lost = Some(why),
                    Err(e) => return Err(e),
                }
            }
            if let Some(why) = lost {
                self.metrics.inc(&m::HF_HANDSHAKE_RETRIES, &[]);
                reasons.push(why);
                continue;
            }
            return Ok(Candidates {
                items: merge(merged, &seen, ask.k),
                model_name: self.cfg.model.clone(),
                index_version: plan.version,
                embedding_version: plan.version,
                host: hosts.join(","),
                attempts,
            });
        }
        Err(HomefeedError::NoHostAnswered {
            reasons: reasons.join("; "),
        })
    }

    /// One shard's answer for `version` (any version with `allow_mismatch`) from the first of
    /// `replicas` that gives one.
    async fn search_shard(
        &self,
        replicas: &[usize],
        version: ModelVersion,
        allow_mismatch: bool,
        probe: &Probe,
        deadline: Instant,
    ) -> Result<(ShardAnswer, String), HomefeedError> {
        let mut why = Vec::new();
        for &h in replicas {
            let host = &self.hosts[h];
            let hs = Handshake {
                host,
                version,
                allow_mismatch,
            };
            host.in_flight.fetch_add(1, Ordering::Relaxed);
            let r = self.ask_host(&hs, probe.clone(), deadline).await;
            host.in_flight.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok((answered, items)) => {
                    return Ok((ShardAnswer::Items(answered, items), host.url().to_string()))
                }
                Err(Searched::Failed(Attempt::Fatal(e))) => return Err(e),
                Err(Searched::Refused(w) | Searched::Failed(Attempt::NextHost(w))) => {
                    self.metrics.inc(&m::HF_FAILOVERS, &[]);
                    why.push(format!("{}: {w}", host.url()));
                }
            }
        }
        Ok((ShardAnswer::Lost(why.join("; ")), String::new()))
    }
}

impl Orchestrator {
    /// The naive mode over shards: the newest version's embedding, one live replica per shard
    /// whatever version it serves, no retry of a mixed answer.
    pub(super) async fn naive_sharded(
        &self,
        ask: &Ask<'_>,
        deadline: Instant,
    ) -> Result<Candidates, HomefeedError> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let views = self.views(deadline).await;
        let shards = views.iter().flatten().map(|v| v.shards).max().unwrap_or(1);
        let mut replicas: Vec<Vec<usize>> = vec![Vec::new(); shards as usize];
        for (h, v) in views.iter().enumerate() {
            if let Some(v) = v.filter(|v| v.shards == shards && v.shard < shards) {
                replicas[v.shard as usize].push(h);
            }
        }
        if let Some(missing) = replicas.iter().position(Vec::is_empty) {
            return Err(HomefeedError::NoHostAnswered {
                reasons: format!("no live replica of shard {missing} of {shards}"),
            });
        }
        for r in &mut replicas {
            let n = r.len();
            r.rotate_left(turn % n);
        }
        let version = self.newest_version(deadline).await?;
        let hs = Handshake {
            host: &self.hosts[replicas[0][0]],
            version,
            allow_mismatch: true,
        };
        let embedded = match self.embed(hs, ask, deadline).await {
            Ok(e) => e,
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::NextHost(why)) => {
                return Err(HomefeedError::NoHostAnswered { reasons: why })
            }
        };
        if let Some(hook) = &self.cfg.between_embed_and_search {
            hook(self.hosts[replicas[0][0]].url()).await;
        }
        let (probe, seen) = probe(&embedded, ask);
        let searches = replicas
            .iter()
            .map(|r| self.search_shard(r, version, true, &probe, deadline));
        let mut merged = Vec::new();
        let mut hosts = Vec::new();
        let mut answered = version;
        for a in futures_util::future::join_all(searches).await {
            match a? {
                (ShardAnswer::Items(v, items), host) => {
                    if v != version {
                        answered = v;
                    }
                    merged.extend(items);
                    hosts.push(host);
                }
                (ShardAnswer::Lost(why), _) => {
                    return Err(HomefeedError::NoHostAnswered { reasons: why })
                }
            }
        }
        Ok(Candidates {
            items: merge(merged, &seen, ask.k),
            model_name: self.cfg.model.clone(),
            index_version: answered,
            embedding_version: version,
            host: hosts.join(","),
            attempts: 1,
        })
    }
}

/// Values of [`Orchestrator::sharded`].
pub(super) const UNKNOWN: u8 = 0;
pub(super) const WHOLE: u8 = 1;
pub(super) const SHARDED: u8 = 2;

impl Host {
    /// The cached view while fresh.
    fn view(&self, ttl: std::time::Duration) -> Option<View> {
        let (version, shape) = self.cached.get(ttl)?;
        Some(View {
            version: ModelVersion(version),
            shard: (shape >> 32) as u32,
            shards: shape as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(version: u64, shard: u32, shards: u32) -> Option<View> {
        Some(View {
            version: ModelVersion(version),
            shard,
            shards,
        })
    }

    #[test]
    fn a_version_is_chosen_only_with_a_live_replica_on_every_shard() {
        // v2 on shard 0 only (mid-rollout); v1 everywhere.
        let views = [v(2, 0, 2), v(1, 0, 2), v(1, 1, 2), None];
        let p = choose(&views, &HashSet::new(), 0).unwrap();
        assert_eq!(p.version, ModelVersion(1));
        assert_eq!(p.replicas, vec![vec![1], vec![2]]);
        // Both covered: turns split by capacity (fewest replicas on a shard): v1 has 2 on
        // every shard, v2 has 1 on shard 0 → v1 takes 2 turns in 3.
        let views = [
            v(2, 0, 2),
            v(2, 1, 2),
            v(2, 1, 2),
            v(1, 0, 2),
            v(1, 1, 2),
            v(1, 0, 2),
            v(1, 1, 2),
        ];
        let picked: Vec<u64> = (0..6)
            .map(|t| choose(&views, &HashSet::new(), t).unwrap().version.0)
            .collect();
        assert_eq!(picked.iter().filter(|&&v| v == 1).count(), 4, "{picked:?}");
        assert_eq!(picked.iter().filter(|&&v| v == 2).count(), 2, "{picked:?}");
        let views = [v(2, 0, 2), v(2, 1, 2), v(1, 0, 2), v(1, 1, 2)];
        // Skipping v2 (the user tower lacks it) leaves v1.
        let skip = HashSet::from([ModelVersion(2)]);
        assert_eq!(choose(&views, &skip, 0).unwrap().version, ModelVersion(1));
        // No full coverage: an error that says what the fleet looks like.
        let e = choose(&[v(2, 0, 2), v(1, 1, 2)], &HashSet::new(), 0)
            .err()
            .unwrap();
        assert!(
            e.contains("no version has a live replica on every shard"),
            "{e}"
        );
        assert!(
            e.contains("v1 over 2 shards, replicas per shard [0, 1]"),
            "{e}"
        );
    }

    #[test]
    fn replicas_of_a_shard_take_turns() {
        let views = [v(1, 0, 1), v(1, 0, 1), v(1, 0, 1)];
        let firsts: Vec<usize> = (0..3)
            .map(|t| choose(&views, &HashSet::new(), t).unwrap().replicas[0][0])
            .collect();
        assert_eq!(firsts, vec![0, 1, 2]);
    }
}
