//! Commits a group of calls in one transaction with a fixed number of statements per group, not
//! per call: one insert each for quarantine, events, new entities, links and jobs, one locked read
//! of the entities the group touches, and one update per changed existing entity. Statement
//! round trips, not fsyncs, are what limit an embedded database's write rate.

use std::collections::{HashMap, HashSet};

use leadrelay_proto::v1::{Deal, Lead};
use sqlx::{Any, Transaction};

use super::{
    CheckedCall, HanaCall, IngestError, IngestOutcome, ValidCall, Verdict, new_id, now_ms,
    source_key,
};
use crate::{
    entity::{CanonicalEntity, EventFacts},
    mapping,
    routes::{self, EntityType},
    store::{Backend, Store},
};

/// A call that passed validation, with the ids it will be stored under.
struct Accepted<'a> {
    /// Its position in the group.
    index: usize,
    call: &'a HanaCall,
    valid: ValidCall<'a>,
    event_id: String,
    dedupe_key: String,
}

impl Accepted<'_> {
    fn source_key(&self) -> String {
        source_key(&self.valid.webhook.application_id, &self.valid.hana_id)
    }
}

/// Renders parameter placeholders the way each engine resolves them fastest: `$1, $2, …` on
/// Postgres; anonymous `?` on SQLite, which binds them in order. (SQLite looks named parameters up
/// by a linear scan, which is quadratic over a multi-row insert.) Templates mark each parameter
/// with `?` and are bound exactly once per mark, in order.
#[derive(Clone, Copy)]
struct Placeholders(Backend);

impl Placeholders {
    /// `count` copies of `template` (e.g. `(?, 'hana', ?)`), comma-separated.
    fn rows(self, count: usize, template: &str) -> String {
        let rows = vec![template; count].join(", ");
        match self.0 {
            Backend::Sqlite => rows,
            Backend::Postgres => {
                let mut numbered = String::with_capacity(rows.len() * 2);
                let mut number = 0;
                for character in rows.chars() {
                    if character == '?' {
                        number += 1;
                        numbered.push_str(&format!("${number}"));
                    } else {
                        numbered.push(character);
                    }
                }
                numbered
            }
        }
    }

    /// `count` parameters for an `IN (…)` list.
    fn list(self, count: usize) -> String {
        self.rows(count, "?")
    }
}

/// Stores every call of the group in one transaction; the outcomes are in the calls' order.
pub(super) async fn commit_group(
    store: &Store,
    checked: &[&CheckedCall],
) -> Result<Vec<IngestOutcome>, IngestError> {
    let now = now_ms();
    let calls: Vec<&HanaCall> = checked.iter().map(|checked| &checked.call).collect();
    let mut outcomes: Vec<Option<IngestOutcome>> = vec![None; calls.len()];
    let mut quarantined = Vec::new();
    let mut accepted = Vec::new();
    for (index, checked) in checked.iter().enumerate() {
        match (&checked.verdict, &checked.call.body) {
            (
                Verdict::Accept {
                    kind,
                    hana_id,
                    dedupe_key,
                },
                Ok(webhook),
            ) => accepted.push(Accepted {
                index,
                call: &checked.call,
                valid: ValidCall {
                    kind: *kind,
                    webhook,
                    hana_id: hana_id.clone(),
                },
                dedupe_key: dedupe_key.clone(),
                event_id: new_id("evt"),
            }),
            (Verdict::Quarantine(reason), _) | (Verdict::Accept { .. }, Err(reason)) => {
                quarantined.push((index, new_id("qtn"), reason.clone()));
            }
        }
    }

    let sql = Placeholders(store.backend());
    let mut transaction = store.pool().begin().await?;
    insert_quarantined(&mut transaction, sql, &calls, &quarantined).await?;
    for (index, id, reason) in quarantined {
        tracing::info!(quarantine_id = %id, reason, "webhook kept in quarantine");
        outcomes[index] = Some(IngestOutcome {
            event_id: id,
            duplicate: false,
            quarantined: true,
        });
    }

    // The first call with each key may be new; any later one in the group is a redelivery.
    let mut seen_keys = HashSet::new();
    let candidates: Vec<&Accepted<'_>> = accepted
        .iter()
        .filter(|call| seen_keys.insert(call.dedupe_key.as_str()))
        .collect();
    let inserted = insert_events(&mut transaction, sql, &candidates).await?;
    let mut fresh = Vec::new();
    for call in &accepted {
        if inserted.get(&call.dedupe_key) == Some(&call.event_id) {
            fresh.push(call);
        } else {
            let first: String = sqlx::query_scalar(
                "UPDATE events SET duplicate_count = duplicate_count + 1 \
                 WHERE source = 'hana' AND dedupe_key = $1 RETURNING id",
            )
            .bind(&call.dedupe_key)
            .fetch_one(&mut *transaction)
            .await?;
            outcomes[call.index] = Some(IngestOutcome {
                event_id: first,
                duplicate: true,
                quarantined: false,
            });
        }
    }

    let (lead_calls, deal_calls): (Vec<&Accepted<'_>>, Vec<&Accepted<'_>>) = fresh
        .iter()
        .partition(|call| EntityType::of(call.valid.kind) == EntityType::Lead);
    let mut entity_ids = apply_entities::<Lead>(
        &mut transaction,
        store.backend(),
        sql,
        &lead_calls,
        &HashMap::new(),
        now,
    )
    .await?;
    let contacts = contact_leads(&mut transaction, sql, &deal_calls).await?;
    entity_ids.extend(
        apply_entities::<Deal>(
            &mut transaction,
            store.backend(),
            sql,
            &deal_calls,
            &contacts,
            now,
        )
        .await?,
    );
    insert_jobs(&mut transaction, sql, &fresh, &entity_ids, now).await?;
    transaction.commit().await?;

    for call in fresh {
        outcomes[call.index] = Some(IngestOutcome {
            event_id: call.event_id.clone(),
            duplicate: false,
            quarantined: false,
        });
    }
    Ok(outcomes.into_iter().flatten().collect())
}

async fn insert_quarantined(
    transaction: &mut Transaction<'static, Any>,
    sql: Placeholders,
    calls: &[&HanaCall],
    quarantined: &[(usize, String, String)],
) -> Result<(), IngestError> {
    if quarantined.is_empty() {
        return Ok(());
    }
    let insert = format!(
        "INSERT INTO quarantine (id, source, kind, reason, raw_body, received_at) VALUES {}",
        sql.rows(quarantined.len(), "(?, 'hana', ?, ?, ?, ?)")
    );
    let mut query = sqlx::query(&insert);
    for (index, id, reason) in quarantined {
        let call = calls[*index];
        query = query
            .bind(id)
            .bind(call.kind.event_name())
            .bind(reason)
            .bind(call.raw_body.as_slice())
            .bind(call.received_at_ms);
    }
    query.execute(&mut **transaction).await?;
    Ok(())
}

/// Inserts the candidates' events; returns dedupe key → id of those that were new.
async fn insert_events(
    transaction: &mut Transaction<'static, Any>,
    sql: Placeholders,
    candidates: &[&Accepted<'_>],
) -> Result<HashMap<String, String>, IngestError> {
    if candidates.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "INSERT INTO events (id, source, kind, application_id, dedupe_key, raw_body, received_at, trace_context) \
         VALUES {} ON CONFLICT (source, dedupe_key) DO NOTHING RETURNING dedupe_key, id",
        sql.rows(candidates.len(), "(?, 'hana', ?, ?, ?, ?, ?, ?)")
    );
    let mut query = sqlx::query_as::<_, (String, String)>(&sql);
    for call in candidates {
        query = query
            .bind(&call.event_id)
            .bind(call.valid.kind.event_name())
            .bind(&call.valid.webhook.application_id)
            .bind(&call.dedupe_key)
            .bind(call.call.raw_body.as_slice())
            .bind(call.call.received_at_ms)
            .bind(call.call.trace_context.as_deref());
    }
    Ok(query
        .fetch_all(&mut **transaction)
        .await?
        .into_iter()
        .collect())
}

/// Ids of the stored leads that tickets in the group name in their `lead` section, by source key.
async fn contact_leads(
    transaction: &mut Transaction<'static, Any>,
    sql: Placeholders,
    deal_calls: &[&Accepted<'_>],
) -> Result<HashMap<String, String>, IngestError> {
    let keys: Vec<String> = deal_calls
        .iter()
        .filter_map(|call| {
            let hana_id = mapping::hana_id(&call.valid.webhook.lead);
            (!hana_id.is_empty()).then(|| source_key(&call.valid.webhook.application_id, &hana_id))
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let select = format!(
        "SELECT source_key, id FROM leads WHERE source_key IN ({})",
        sql.list(keys.len())
    );
    let mut query = sqlx::query_as::<_, (String, String)>(&select);
    for key in &keys {
        query = query.bind(key);
    }
    Ok(query
        .fetch_all(&mut **transaction)
        .await?
        .into_iter()
        .collect())
}

/// An entity being changed by the group.
struct Working<E> {
    id: String,
    source_key: String,
    hana_id: String,
    entity: E,
    is_new: bool,
}

/// Applies the group's events to their entities, in order, and writes each changed entity once.
/// Returns the entity id of each call, by its position in the group.
async fn apply_entities<E: CanonicalEntity>(
    transaction: &mut Transaction<'static, Any>,
    backend: Backend,
    sql: Placeholders,
    calls: &[&Accepted<'_>],
    contacts: &HashMap<String, String>,
    now: i64,
) -> Result<HashMap<usize, String>, IngestError> {
    if calls.is_empty() {
        return Ok(HashMap::new());
    }
    let keys: Vec<String> = calls
        .iter()
        .map(|call| call.source_key())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // On Postgres the rows stay locked until commit, so replicas apply updates of one entity one
    // after the other instead of overwriting each other.
    let lock = match backend {
        Backend::Postgres => " FOR UPDATE",
        Backend::Sqlite => "",
    };
    let select = format!(
        "SELECT source_key, id, body FROM {} WHERE source_key IN ({}){lock}",
        E::TABLE,
        sql.list(keys.len())
    );
    let mut query = sqlx::query_as::<_, (String, String, Vec<u8>)>(&select);
    for key in &keys {
        query = query.bind(key);
    }
    let mut stored: HashMap<String, (String, Vec<u8>)> = query
        .fetch_all(&mut **transaction)
        .await?
        .into_iter()
        .map(|(key, id, body)| (key, (id, body)))
        .collect();

    let mut working: HashMap<String, Working<E>> = HashMap::new();
    let mut entity_ids = HashMap::new();
    for call in calls {
        let key = call.source_key();
        let entry = working
            .entry(key)
            .or_insert_with_key(|key| match stored.remove(key) {
                Some((id, body)) => Working {
                    id,
                    source_key: key.clone(),
                    hana_id: call.valid.hana_id.clone(),
                    entity: E::decode(body.as_slice()).unwrap_or_default(),
                    is_new: false,
                },
                None => Working {
                    id: new_id(E::ID_PREFIX),
                    source_key: key.clone(),
                    hana_id: call.valid.hana_id.clone(),
                    entity: E::default(),
                    is_new: true,
                },
            });
        let contact_key = source_key(
            &call.valid.webhook.application_id,
            &mapping::hana_id(&call.valid.webhook.lead),
        );
        entry.entity.apply(&EventFacts {
            id: &entry.id,
            is_new: entry.is_new,
            kind: call.valid.kind,
            webhook: call.valid.webhook,
            hana_id: &call.valid.hana_id,
            contact_lead_id: contacts.get(&contact_key).map(String::as_str),
            now,
        });
        entity_ids.insert(call.index, entry.id.clone());
    }

    let (new, existing): (Vec<&Working<E>>, Vec<&Working<E>>) =
        working.values().partition(|entity| entity.is_new);
    insert_entities(transaction, sql, &new, now).await?;
    for entity in existing {
        let update = if E::HAS_CONTACT {
            format!(
                "UPDATE {} SET body = $1, updated_at = $2, deleted_at = $3, contact_lead_id = $5 WHERE id = $4",
                E::TABLE
            )
        } else {
            format!(
                "UPDATE {} SET body = $1, updated_at = $2, deleted_at = $3 WHERE id = $4",
                E::TABLE
            )
        };
        let mut query = sqlx::query(&update)
            .bind(entity.entity.encode_to_vec())
            .bind(now)
            .bind(entity.entity.deleted_at_ms())
            .bind(&entity.id);
        if E::HAS_CONTACT {
            query = query.bind(entity.entity.contact_lead_id());
        }
        query.execute(&mut **transaction).await?;
    }
    Ok(entity_ids)
}

/// Inserts new entities and their Hana links. Another replica inserting one of them first is a
/// [`IngestError::Conflict`]: the group is retried and then finds it.
async fn insert_entities<E: CanonicalEntity>(
    transaction: &mut Transaction<'static, Any>,
    sql: Placeholders,
    new: &[&Working<E>],
    now: i64,
) -> Result<(), IngestError> {
    if new.is_empty() {
        return Ok(());
    }
    let (columns, row) = if E::HAS_CONTACT {
        (
            "id, source_key, body, deleted_at, contact_lead_id, created_at, updated_at",
            "(?, ?, ?, ?, ?, ?, ?)",
        )
    } else {
        (
            "id, source_key, body, deleted_at, created_at, updated_at",
            "(?, ?, ?, ?, ?, ?)",
        )
    };
    let insert = format!(
        "INSERT INTO {} ({columns}) VALUES {} ON CONFLICT (source_key) DO NOTHING RETURNING id",
        E::TABLE,
        sql.rows(new.len(), row)
    );
    let mut query = sqlx::query_scalar::<_, String>(&insert);
    for entity in new {
        query = query
            .bind(&entity.id)
            .bind(&entity.source_key)
            .bind(entity.entity.encode_to_vec())
            .bind(entity.entity.deleted_at_ms());
        if E::HAS_CONTACT {
            query = query.bind(entity.entity.contact_lead_id());
        }
        query = query.bind(now).bind(now);
    }
    let inserted = query.fetch_all(&mut **transaction).await?;
    if inserted.len() != new.len() {
        return Err(IngestError::Conflict);
    }

    let insert = format!(
        "INSERT INTO links (entity_type, entity_id, system, kind, remote_id, linked_at) VALUES {} \
         ON CONFLICT DO NOTHING",
        sql.rows(new.len(), "(?, ?, 'hana', ?, ?, ?)")
    );
    let mut query = sqlx::query(&insert);
    for entity in new {
        query = query
            .bind(E::ENTITY_TYPE.as_str())
            .bind(&entity.id)
            .bind(E::HANA_LINK_KIND)
            .bind(&entity.hana_id)
            .bind(now);
    }
    query.execute(&mut **transaction).await?;
    Ok(())
}

/// Records the jobs of the default flows for every new event.
async fn insert_jobs(
    transaction: &mut Transaction<'static, Any>,
    sql: Placeholders,
    fresh: &[&Accepted<'_>],
    entity_ids: &HashMap<usize, String>,
    now: i64,
) -> Result<(), IngestError> {
    let mut jobs = Vec::new();
    for call in fresh {
        let Some(entity_id) = entity_ids.get(&call.index) else {
            continue;
        };
        let has_conversation = !call.valid.webhook.conversation_url.is_empty();
        for planned in routes::default_plan(call.valid.kind, has_conversation) {
            jobs.push((call, entity_id, planned));
        }
    }
    if jobs.is_empty() {
        return Ok(());
    }
    let insert = format!(
        "INSERT INTO jobs (id, event_id, target, operation, entity_type, entity_id, trace_context, \
         next_attempt_at, created_at, updated_at, state, attempts, last_error) VALUES {}",
        sql.rows(
            jobs.len(),
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, '')"
        )
    );
    let mut query = sqlx::query(&insert);
    for (call, entity_id, planned) in jobs {
        query = query
            .bind(new_id("job"))
            .bind(&call.event_id)
            .bind(planned.target.as_str())
            .bind(planned.operation.as_str())
            .bind(EntityType::of(call.valid.kind).as_str())
            .bind(entity_id)
            .bind(call.call.trace_context.as_deref())
            .bind(now)
            .bind(now)
            .bind(now);
    }
    query.execute(&mut **transaction).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_on_postgres_and_anonymous_on_sqlite() {
        let template = "(?, 'hana', ?)";
        assert_eq!(
            Placeholders(Backend::Postgres).rows(2, template),
            "($1, 'hana', $2), ($3, 'hana', $4)"
        );
        assert_eq!(
            Placeholders(Backend::Sqlite).rows(2, template),
            "(?, 'hana', ?), (?, 'hana', ?)"
        );
        assert_eq!(Placeholders(Backend::Postgres).list(3), "$1, $2, $3");
    }
}
