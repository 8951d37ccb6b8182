//! Commits a group of calls in one transaction. On Postgres the number of statements is fixed
//! per group, not per call, since every statement is a network round trip: one read of the
//! entities the group touches, one insert each for events and new entities, one update per
//! changed existing entity, and one statement for the rest (see [`Tail`]); each binds the group's
//! rows as one array per column.
//! SQLite, in process, runs the same statements one row at a time (see [`Sql`]).

use std::collections::{HashMap, HashSet, hash_map::Entry};

use leadrelay_proto::v1::{Deal, HanaEventKind, Lead};

use super::{
    CheckedCall, HanaCall, IngestError, IngestOutcome, SQLITE_BY_SOURCE_KEY, ValidCall, Verdict,
    new_id, now_ms, source_key, source_key_tail,
    sql::{Cell, Column, GroupTransaction, Param},
};
use crate::{
    entity::{CanonicalEntity, EventFacts},
    mapping,
    routes::{self, EntityType},
    store::{Backend, StoreError},
};

/// A call that passed validation, with the ids it will be stored under.
struct Accepted<'a> {
    /// Its position in the group.
    index: usize,
    call: &'a HanaCall,
    valid: ValidCall<'a>,
    event_id: String,
    /// The key of the entity it changes (see [`source_key`]).
    source_key: String,
    /// The hash of its body that recognises a redelivery (see `ingest::content_hash`).
    content_hash: &'a str,
    /// The entity it changes, once resolved; empty before.
    entity_id: String,
    /// Whether that entity was stored before this group.
    entity_was_stored: bool,
    /// The key its event is stored under, once the entity is resolved: see [`dedupe_key`].
    dedupe_key: String,
    /// The jobs it implies, as routed.
    plan: &'a [routes::PlannedJob],
}

/// The key a Hana event is stored under: the id of the entity it changes, then its content hash.
///
/// The hash alone would do, but it is random, so every event would land on a page of its own in
/// the `(source, dedupe_key)` index: a 4 KiB write-ahead log frame per event, and a second write
/// when the page is checkpointed. Entity ids are time-ordered, so the events of new and recent
/// entities, which is most of Hana's traffic, go to the end of the index, many to a page. The
/// content decides the entity (the body names the application and the Hana id), so a redelivery
/// still gets the same key.
fn dedupe_key(entity_id: &str, content_hash: &str) -> String {
    format!("{entity_id}:{content_hash}")
}

/// Renders SQL the way each engine runs it fastest. Templates mark each parameter with `?` and
/// bind exactly once per mark, in order. Postgres gets `$1, $2, …`; SQLite gets anonymous `?`,
/// which it binds in order (it looks named parameters up by a linear scan).
///
/// A statement over many rows is one statement per group on Postgres, where every statement is
/// a network round trip, and one statement per row on SQLite, which has no round trips: there a
/// statement that writes several rows and may abort on a constraint makes SQLite copy every page
/// it touches into a statement journal first, which took 14% of the writer's time with 64-row
/// statements. Either way a statement's text does not depend on how many rows it carries, so each
/// stays prepared in its connection's cache. On Postgres the rows are bound as one array per
/// column: with a `VALUES` row per call, every group size was a statement text of its own, more
/// than the connection's 100 cached statements, so most statements were parsed, planned and
/// prepared again, a round trip more each (measured: 18% of the Postgres ingest rate).
#[derive(Clone, Copy)]
struct Sql(Backend);

impl Sql {
    /// `template` with its placeholders in the engine's form.
    fn render(self, template: &str) -> String {
        match self.0 {
            Backend::Sqlite => template.to_owned(),
            Backend::Postgres => {
                let mut numbered = String::with_capacity(template.len() * 2);
                let mut number = 0;
                for character in template.chars() {
                    if character == '?' {
                        number += 1;
                        numbered.push('$');
                        numbered.push_str(&number.to_string());
                    } else {
                        numbered.push(character);
                    }
                }
                numbered
            }
        }
    }

    /// SQLite's text of `statement`, for one row.
    fn one_row(statement: &Repeated<'_>) -> String {
        format!(
            "{} VALUES {} {}",
            statement.head, statement.row, statement.tail
        )
    }

    /// Postgres's text of `statement` over arrays of the types `array_types`, one per `?` of its
    /// row, bound after `bound` parameters of the statement it is part of:
    /// `{head} SELECT {row, each ? a column} FROM UNNEST($1::type[], …) AS r(c1, …) {tail}`.
    fn unnested(statement: &Repeated<'_>, array_types: &[&str], bound: usize) -> String {
        let row = statement.row.trim();
        let row = row
            .strip_prefix('(')
            .and_then(|row| row.strip_suffix(')'))
            .unwrap_or(row);
        let mut select = String::with_capacity(row.len() * 2);
        let mut column = 0;
        for character in row.chars() {
            if character == '?' {
                column += 1;
                select.push_str(&format!("r.c{column}"));
            } else {
                select.push(character);
            }
        }
        let arrays: Vec<String> = array_types
            .iter()
            .enumerate()
            .map(|(index, array_type)| format!("${}::{array_type}", bound + index + 1))
            .collect();
        let names: Vec<String> = (1..=array_types.len())
            .map(|column| format!("c{column}"))
            .collect();
        let returning = statement
            .returning
            .as_ref()
            .map(|returning| format!(" RETURNING {}", returning.columns))
            .unwrap_or_default();
        format!(
            "{} SELECT {select} FROM UNNEST({}) AS r({}) {}{returning}",
            statement.head,
            arrays.join(", "),
            names.join(", "),
            statement.tail
        )
    }

    /// The text of `lookup` for one key (SQLite) or for an array of keys (Postgres).
    fn lookup(self, lookup: &Lookup<'_>) -> String {
        match self.0 {
            Backend::Sqlite => format!("{} IN (?){}", lookup.head, lookup.tail),
            Backend::Postgres => format!("{} = ANY($1::text[]){}", lookup.head, lookup.tail),
        }
    }
}

/// A statement over rows, `{head} VALUES {row} {tail}`, where `row` marks each parameter with
/// `?` (e.g. `(?, 'hana', ?)`): run once per row on SQLite, once over arrays on Postgres (see
/// [`Sql`]).
struct Repeated<'s> {
    /// `INSERT INTO {table} ({columns})`, without `VALUES`.
    head: &'s str,
    row: &'s str,
    tail: &'s str,
    /// What the statement returns of each row it writes.
    returning: Option<Returning<'s>>,
}

/// Values of each row a statement writes, all of them the row's own parameters. Postgres returns
/// them (`RETURNING`). SQLite, which runs a statement per row, takes them from the parameters of
/// each row its statement changed: SQLite runs `RETURNING` as a trigger, and a statement with a
/// trigger copies every page it changes into a statement journal first (measured: 8% of the
/// SQLite writer's time per webhook, 42.7 against 39.1 µs).
struct Returning<'s> {
    /// The columns, as `RETURNING` names them.
    columns: &'s str,
    /// The position of each column's parameter in the row.
    params: &'s [usize],
}

/// A statement that finds rows by a text key: `{head} IN (?){tail}` once per key on SQLite,
/// `{head} = ANY($1){tail}` over every key on Postgres. `head` ends with the key's column.
struct Lookup<'s> {
    head: &'s str,
    tail: &'s str,
}

/// Runs `statement` over `rows`; returns the rows it returned.
async fn for_rows<'r, T, R, F>(
    transaction: &mut T,
    sql: Sql,
    statement: &Repeated<'_>,
    rows: &'r [R],
    columns: &[Column],
    params_of: F,
) -> Result<Vec<Vec<Cell>>, IngestError>
where
    T: GroupTransaction,
    R: Sync,
    F: Fn(&'r R, &mut Vec<Param<'r>>) + Send,
{
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let rows = StatementRows::collect(statement, rows, params_of);
    match sql.0 {
        Backend::Sqlite => {
            let text = Sql::one_row(statement);
            let mut returned = Vec::new();
            for row in rows.each_row()? {
                let changed = transaction.execute(&text, row).await?;
                if let (Some(returning), true) = (&statement.returning, changed > 0) {
                    let cells = returning
                        .params
                        .iter()
                        .map(|&position| row.get(position).and_then(Param::returned))
                        .collect::<Option<Vec<Cell>>>()
                        .ok_or_else(|| {
                            misaligned("a returned column whose parameter is a number or missing")
                        })?;
                    returned.push(cells);
                }
            }
            Ok(returned)
        }
        Backend::Postgres => {
            let (text, arrays) = rows.unnested(0)?;
            run(transaction, &text, &arrays, columns).await
        }
    }
}

/// A statement over rows with the parameters of every row, one row after the other.
struct StatementRows<'s, 'a> {
    statement: &'s Repeated<'s>,
    rows: usize,
    params: Vec<Param<'a>>,
}

impl<'s, 'a> StatementRows<'s, 'a> {
    /// `statement` over `rows`, each giving its parameters through `params_of`.
    fn collect<R>(
        statement: &'s Repeated<'s>,
        rows: &'a [R],
        params_of: impl Fn(&'a R, &mut Vec<Param<'a>>),
    ) -> Self {
        let mut params = Vec::new();
        for row in rows {
            params_of(row, &mut params);
        }
        Self {
            statement,
            rows: rows.len(),
            params,
        }
    }

    /// Each row's parameters (SQLite: one statement per row).
    fn each_row(&self) -> Result<std::slice::Chunks<'_, Param<'a>>, IngestError> {
        Ok(self.params.chunks(row_width(self.params.len(), self.rows)?))
    }

    /// The statement over one array per column, its arrays bound after `bound` parameters of the
    /// statement it is part of (Postgres: one statement for every row); its text and arrays.
    fn unnested(self, bound: usize) -> Result<(String, Vec<Param<'a>>), IngestError> {
        let arrays = into_columns(self.params, self.rows)?;
        let array_types: Vec<&str> = arrays.iter().filter_map(Param::array_type).collect();
        Ok((Sql::unnested(self.statement, &array_types, bound), arrays))
    }
}

/// Runs `lookup` over `keys`; returns the rows it found.
async fn for_keys<T: GroupTransaction>(
    transaction: &mut T,
    sql: Sql,
    lookup: &Lookup<'_>,
    keys: &[&str],
    columns: &[Column],
) -> Result<Vec<Vec<Cell>>, IngestError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let text = sql.lookup(lookup);
    match sql.0 {
        Backend::Sqlite => {
            let mut found = Vec::new();
            for key in keys {
                found.extend(run(transaction, &text, &[Param::Text(key)], columns).await?);
            }
            Ok(found)
        }
        Backend::Postgres => {
            let keys = Param::TextArray(keys.iter().map(|key| Some(*key)).collect());
            run(transaction, &text, &[keys], columns).await
        }
    }
}

/// Runs a statement: fetches its rows when it names `columns`, executes it when it names none.
async fn run<T: GroupTransaction>(
    transaction: &mut T,
    text: &str,
    params: &[Param<'_>],
    columns: &[Column],
) -> Result<Vec<Vec<Cell>>, IngestError> {
    if columns.is_empty() {
        transaction.execute(text, params).await?;
        Ok(Vec::new())
    } else {
        transaction.fetch(text, params, columns).await
    }
}

/// `params`, `rows` rows of the same width one after the other, as one array per column.
fn into_columns(params: Vec<Param<'_>>, rows: usize) -> Result<Vec<Param<'_>>, IngestError> {
    let width = row_width(params.len(), rows)?;
    let mut arrays: Vec<Param<'_>> = Vec::with_capacity(width);
    for (index, param) in params.into_iter().enumerate() {
        if index < width {
            arrays.push(param.into_array());
        } else if !param.push_onto(&mut arrays[index % width]) {
            return Err(misaligned("a column of values of different types"));
        }
    }
    Ok(arrays)
}

/// The parameters of each row when `rows` rows have `params` in all.
fn row_width(params: usize, rows: usize) -> Result<usize, IngestError> {
    match params.checked_div(rows) {
        Some(width) if width > 0 && width * rows == params => Ok(width),
        _ => Err(misaligned("rows of different widths")),
    }
}

/// A group statement whose parameters are not rows of one shape: a defect of this module.
fn misaligned(what: &str) -> IngestError {
    IngestError::Store(StoreError::Corrupt(format!(
        "a group statement's rows do not line up: {what}"
    )))
}

/// Each of `items` once, in no particular order: the keys a statement looks up or inserts.
fn distinct<T: Eq + std::hash::Hash>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    items
        .into_iter()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect()
}

/// Pairs of text cells, as `(first, second)`.
fn text_pairs(rows: Vec<Vec<Cell>>) -> impl Iterator<Item = (String, String)> {
    rows.into_iter().filter_map(|row| {
        let mut cells = row.into_iter();
        Some((cells.next()?.into_text(), cells.next()?.into_text()))
    })
}

/// Stores every call of the group in `transaction`; the outcomes are in the calls' order and
/// hold once the caller commits.
pub(super) async fn commit_group<T: GroupTransaction>(
    transaction: &mut T,
    backend: Backend,
    checked: &[&CheckedCall],
) -> Result<Vec<IngestOutcome>, IngestError> {
    let now = now_ms();
    let sql = Sql(backend);
    let mut outcomes: Vec<Option<IngestOutcome>> = vec![None; checked.len()];
    let mut quarantined = Vec::new();
    let mut accepted = Vec::new();
    for (index, checked) in checked.iter().enumerate() {
        match (&checked.verdict, &checked.call.body) {
            (
                Verdict::Accept {
                    kind,
                    hana_id,
                    content_hash,
                    plan,
                },
                Ok(webhook),
            ) => accepted.push(Accepted {
                plan,
                index,
                call: &checked.call,
                source_key: source_key(&webhook.application_id, hana_id),
                valid: ValidCall {
                    kind: *kind,
                    webhook,
                    hana_id: hana_id.clone(),
                },
                content_hash: content_hash.as_str(),
                entity_id: String::new(),
                entity_was_stored: false,
                dedupe_key: String::new(),
                event_id: new_id("evt"),
            }),
            (Verdict::Quarantine(reason), _) | (Verdict::Accept { .. }, Err(reason)) => {
                quarantined.push(Quarantined {
                    index,
                    id: new_id("qtn"),
                    reason: reason.clone(),
                    call: &checked.call,
                });
            }
        }
    }

    for entry in &quarantined {
        tracing::info!(quarantine_id = %entry.id, reason = entry.reason, "webhook kept in quarantine");
        outcomes[entry.index] = Some(IngestOutcome {
            event_id: entry.id.clone(),
            duplicate: false,
            quarantined: true,
        });
    }

    // The entities come first: an event's dedupe key names the entity it changes.
    let (mut leads, mut deals) = (HashMap::new(), HashMap::new());
    let keys_of = |entity_type| -> Vec<String> {
        distinct(
            accepted
                .iter()
                .filter(|call| EntityType::of(call.valid.kind) == entity_type)
                .map(|call| call.source_key.clone()),
        )
    };
    let (lead_keys, deal_keys) = (keys_of(EntityType::Lead), keys_of(EntityType::Deal));
    resolve_entities::<Lead, T>(transaction, sql, &lead_keys, &mut leads).await?;
    resolve_entities::<Deal, T>(transaction, sql, &deal_keys, &mut deals).await?;
    for call in &mut accepted {
        let resolved = match EntityType::of(call.valid.kind) {
            EntityType::Lead => &leads,
            EntityType::Deal => &deals,
        };
        let entity = resolved_entity(resolved, &call.source_key)?;
        call.entity_id = entity.id().to_owned();
        call.entity_was_stored = matches!(entity, Resolved::Stored { .. });
        call.dedupe_key = dedupe_key(&call.entity_id, call.content_hash);
    }
    keep_keys_of_earlier_events(transaction, sql, &mut accepted).await?;

    // The first call with each key may be new; any later one in the group is a redelivery.
    let mut seen_keys = HashSet::new();
    let candidates: Vec<&Accepted<'_>> = accepted
        .iter()
        .filter(|call| seen_keys.insert(call.dedupe_key.as_str()))
        .collect();
    let inserted = insert_events(transaction, sql, &candidates).await?;
    let count_duplicate = sql.render(
        "UPDATE events SET duplicate_count = duplicate_count + 1 \
         WHERE source = 'hana' AND dedupe_key = ? RETURNING id",
    );
    let mut fresh = Vec::new();
    for call in &accepted {
        if inserted.get(&call.dedupe_key) == Some(&call.event_id) {
            fresh.push(call);
        } else {
            let first = transaction
                .fetch(
                    &count_duplicate,
                    &[Param::Text(&call.dedupe_key)],
                    &[Column::Text],
                )
                .await?
                .into_iter()
                .flatten()
                .next()
                .map(Cell::into_text)
                .ok_or_else(|| {
                    IngestError::Store(StoreError::Corrupt(format!(
                        "the event with dedupe key {} vanished during ingest",
                        call.dedupe_key
                    )))
                })?;
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
    let mut links =
        apply_entities::<Lead, T>(transaction, sql, &lead_calls, &leads, &HashMap::new(), now)
            .await?;
    let contacts = contact_leads(transaction, sql, &deal_calls).await?;
    links.extend(
        apply_entities::<Deal, T>(transaction, sql, &deal_calls, &deals, &contacts, now).await?,
    );

    let applications = distinct(
        fresh
            .iter()
            .map(|call| call.valid.webhook.application_id.as_str()),
    );
    let jobs = new_jobs(&fresh);
    insert_tail(
        transaction,
        sql,
        &quarantined,
        &applications,
        &links,
        &jobs,
        now,
    )
    .await?;

    for call in fresh {
        outcomes[call.index] = Some(IngestOutcome {
            event_id: call.event_id.clone(),
            duplicate: false,
            quarantined: false,
        });
    }
    Ok(outcomes.into_iter().flatten().collect())
}

/// Writes, in one [`Tail`], what nothing later in the group reads: the calls kept in quarantine,
/// the Hana applications, the links of new entities and the jobs.
async fn insert_tail<T: GroupTransaction>(
    transaction: &mut T,
    sql: Sql,
    quarantined: &[Quarantined<'_>],
    applications: &[&str],
    links: &[NewLink],
    jobs: &[NewJob<'_>],
    now: i64,
) -> Result<(), IngestError> {
    let mut tail = Tail::default();
    tail.add(&QUARANTINE, quarantined, |entry, params| {
        params.extend([
            Param::Text(&entry.id),
            Param::Text(entry.call.kind.event_name()),
            Param::Text(&entry.reason),
            Param::Blob(&entry.call.raw_body),
            Param::Int(entry.call.received_at_ms),
        ]);
    });
    tail.add(&APPLICATIONS, applications, |application_id, params| {
        params.push(Param::Text(application_id));
    });
    tail.add(&LINKS, links, |link, params| {
        params.extend([
            Param::Text(link.entity_type),
            Param::Text(&link.entity_id),
            Param::Text(link.kind),
            Param::Text(&link.remote_id),
            Param::Int(now),
        ]);
    });
    tail.add(&JOBS, jobs, |job, params| {
        params.extend([
            Param::Text(&job.id),
            Param::Text(&job.call.event_id),
            Param::Text(job.planned.target.as_str()),
            Param::Text(job.planned.operation.as_str()),
            Param::Text(EntityType::of(job.call.valid.kind).as_str()),
            Param::Text(&job.call.entity_id),
            Param::OptionalText(job.call.call.trace_context.as_deref()),
            Param::Int(now + settle_ms(job.call.valid.kind)),
            Param::Int(now),
            Param::Int(now),
        ]);
    });
    tail.run(transaction, sql).await
}

/// A call kept in quarantine.
struct Quarantined<'a> {
    index: usize,
    id: String,
    reason: String,
    call: &'a HanaCall,
}

/// Keeps calls in quarantine.
static QUARANTINE: Repeated<'static> = Repeated {
    head: "INSERT INTO quarantine (id, source, kind, reason, raw_body, received_at)",
    row: "(?, 'hana', ?, ?, ?, ?)",
    tail: "",
    returning: None,
};

/// Inserts the candidates' events; returns dedupe key → id of those that were new.
async fn insert_events<T: GroupTransaction>(
    transaction: &mut T,
    sql: Sql,
    candidates: &[&Accepted<'_>],
) -> Result<HashMap<String, String>, IngestError> {
    let statement = Repeated {
        head: "INSERT INTO events (id, source, kind, application_id, dedupe_key, raw_body, received_at, trace_context)",
        row: "(?, 'hana', ?, ?, ?, ?, ?, ?)",
        tail: "ON CONFLICT (source, dedupe_key) DO NOTHING",
        returning: Some(Returning {
            columns: "dedupe_key, id",
            params: &[3, 0],
        }),
    };
    let rows = for_rows(
        transaction,
        sql,
        &statement,
        candidates,
        &[Column::Text, Column::Text],
        |call, params| {
            params.extend([
                Param::Text(&call.event_id),
                Param::Text(call.valid.kind.event_name()),
                Param::Text(&call.valid.webhook.application_id),
                Param::Text(&call.dedupe_key),
                Param::Blob(&call.call.raw_body),
                Param::Int(call.call.received_at_ms),
                Param::OptionalText(call.call.trace_context.as_deref()),
            ]);
        },
    )
    .await?;
    Ok(text_pairs(rows).collect())
}

/// Records the Hana applications of the group's events, so that a lookup by Hana id knows every
/// application whose source keys to try (see `queries::resolve`). Once an application is known
/// the statement changes no page.
static APPLICATIONS: Repeated<'static> = Repeated {
    head: "INSERT INTO hana_applications (application_id)",
    row: "(?)",
    tail: "ON CONFLICT (application_id) DO NOTHING",
    returning: None,
};

/// Rows whose `source_key` is one of `keys`: `select` names the columns and the table; `lock`
/// follows the condition. SQLite finds a key by its tail as well (see [`SQLITE_BY_SOURCE_KEY`]).
async fn select_by_source_keys<T: GroupTransaction>(
    transaction: &mut T,
    sql: Sql,
    select: &str,
    lock: &str,
    keys: &[String],
    columns: &[Column],
) -> Result<Vec<Vec<Cell>>, IngestError> {
    match sql.0 {
        Backend::Sqlite => {
            let text = format!("{select} WHERE {SQLITE_BY_SOURCE_KEY}{lock}");
            let mut found = Vec::new();
            for key in keys {
                let params = [Param::Text(source_key_tail(key)), Param::Text(key)];
                found.extend(run(transaction, &text, &params, columns).await?);
            }
            Ok(found)
        }
        Backend::Postgres => {
            let head = format!("{select} WHERE source_key");
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let lookup = Lookup {
                head: &head,
                tail: lock,
            };
            for_keys(transaction, sql, &lookup, &keys, columns).await
        }
    }
}

/// The source key of the lead a ticket's `lead` section names; `None` when it names none.
fn contact_key(call: &Accepted<'_>) -> Option<String> {
    let hana_id = mapping::hana_id(&call.valid.webhook.lead);
    (!hana_id.is_empty()).then(|| source_key(&call.valid.webhook.application_id, &hana_id))
}

/// Ids of the stored leads that tickets in the group name in their `lead` section, by source key.
async fn contact_leads<T: GroupTransaction>(
    transaction: &mut T,
    sql: Sql,
    deal_calls: &[&Accepted<'_>],
) -> Result<HashMap<String, String>, IngestError> {
    let keys = distinct(deal_calls.iter().filter_map(|call| contact_key(call)));
    let rows = select_by_source_keys(
        transaction,
        sql,
        "SELECT source_key, id FROM leads",
        "",
        &keys,
        &[Column::Text, Column::Text],
    )
    .await?;
    Ok(text_pairs(rows).collect())
}

/// An entity being changed by the group.
struct Working<E> {
    id: String,
    source_key: String,
    hana_id: String,
    entity: E,
    is_new: bool,
}

/// An entity ready to be written: its encoded body and the columns derived from it.
struct Encoded<'w> {
    id: &'w str,
    source_key: &'w str,
    hana_id: &'w str,
    body: Vec<u8>,
    deleted_at: Option<i64>,
    contact_lead_id: Option<String>,
}

impl<'w> Encoded<'w> {
    fn new<E: CanonicalEntity>(working: &'w Working<E>) -> Self {
        Self {
            id: &working.id,
            source_key: &working.source_key,
            hana_id: &working.hana_id,
            body: working.entity.encode_to_vec(),
            deleted_at: working.entity.deleted_at_ms(),
            contact_lead_id: working.entity.contact_lead_id(),
        }
    }
}

/// An entity a group's calls change, as found before their events are stored.
enum Resolved {
    /// Stored before the group: its id and encoded body.
    Stored { id: String, body: Vec<u8> },
    /// Created by the group, under this id.
    New { id: String },
}

impl Resolved {
    fn id(&self) -> &str {
        match self {
            Self::Stored { id, .. } | Self::New { id } => id,
        }
    }
}

/// The entity resolved under `source_key`; every accepted call's key is resolved before use.
fn resolved_entity<'r>(
    resolved: &'r HashMap<String, Resolved>,
    source_key: &str,
) -> Result<&'r Resolved, IngestError> {
    resolved.get(source_key).ok_or_else(|| {
        IngestError::Store(StoreError::Corrupt(format!(
            "the entity of {source_key} was not resolved"
        )))
    })
}

/// Finds the stored entities of `E` under `keys` and gives every other key a new id; adds them
/// to `resolved` by source key.
async fn resolve_entities<E: CanonicalEntity, T: GroupTransaction>(
    transaction: &mut T,
    sql: Sql,
    keys: &[String],
    resolved: &mut HashMap<String, Resolved>,
) -> Result<(), IngestError> {
    if keys.is_empty() {
        return Ok(());
    }
    // On Postgres the rows stay locked until commit, so replicas apply updates of one entity one
    // after the other instead of overwriting each other. SQLite has one writer.
    let lock = match sql.0 {
        Backend::Postgres => " FOR UPDATE",
        Backend::Sqlite => "",
    };
    let rows = select_by_source_keys(
        transaction,
        sql,
        &format!("SELECT source_key, id, body FROM {}", E::TABLE),
        lock,
        keys,
        &[Column::Text, Column::Text, Column::Blob],
    )
    .await?;
    for row in rows {
        let mut cells = row.into_iter();
        if let (Some(key), Some(id), Some(body)) = (cells.next(), cells.next(), cells.next()) {
            resolved.insert(
                key.into_text(),
                Resolved::Stored {
                    id: id.into_text(),
                    body: body.into_blob(),
                },
            );
        }
    }
    for key in keys {
        resolved
            .entry(key.clone())
            .or_insert_with(|| Resolved::New {
                id: new_id(E::ID_PREFIX),
            });
    }
    Ok(())
}

/// Events stored before dedupe keys named their entity are keyed by their content hash alone. A
/// call on an entity stored before this group takes that key when an event holds it, so that a
/// redelivery of such an event is still answered as a duplicate. (An entity the group creates
/// has no events yet: its calls need no look-up.)
async fn keep_keys_of_earlier_events<T: GroupTransaction>(
    transaction: &mut T,
    sql: Sql,
    accepted: &mut [Accepted<'_>],
) -> Result<(), IngestError> {
    let hashes = distinct(
        accepted
            .iter()
            .filter(|call| call.entity_was_stored)
            .map(|call| call.content_hash),
    );
    let lookup = Lookup {
        head: "SELECT dedupe_key FROM events WHERE source = 'hana' AND dedupe_key",
        tail: "",
    };
    let found: HashSet<String> = for_keys(transaction, sql, &lookup, &hashes, &[Column::Text])
        .await?
        .into_iter()
        .flatten()
        .map(Cell::into_text)
        .collect();
    for call in accepted {
        if call.entity_was_stored && found.contains(call.content_hash) {
            call.dedupe_key = call.content_hash.to_owned();
        }
    }
    Ok(())
}

/// Applies the group's events to their `resolved` entities, in order, and writes each changed
/// entity once; returns the links the new ones need, which the group's [`Tail`] writes.
async fn apply_entities<E: CanonicalEntity, T: GroupTransaction>(
    transaction: &mut T,
    sql: Sql,
    calls: &[&Accepted<'_>],
    resolved: &HashMap<String, Resolved>,
    contacts: &HashMap<String, String>,
    now: i64,
) -> Result<Vec<NewLink>, IngestError> {
    let mut working: HashMap<&str, Working<E>> = HashMap::new();
    for call in calls {
        let key = call.source_key.as_str();
        let entry = match working.entry(key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(slot) => {
                let (id, entity, is_new) = match resolved_entity(resolved, key)? {
                    Resolved::Stored { id, body } => {
                        (id, E::decode(body.as_slice()).unwrap_or_default(), false)
                    }
                    Resolved::New { id } => (id, E::default(), true),
                };
                slot.insert(Working {
                    id: id.clone(),
                    source_key: key.to_owned(),
                    hana_id: call.valid.hana_id.clone(),
                    entity,
                    is_new,
                })
            }
        };
        // Only a ticket names a contact lead; a lead's own section would only name itself.
        let contact_lead_id = if E::HAS_CONTACT {
            contact_key(call)
                .and_then(|key| contacts.get(&key))
                .map(String::as_str)
        } else {
            None
        };
        entry.entity.apply(&EventFacts {
            id: &entry.id,
            is_new: entry.is_new,
            kind: call.valid.kind,
            webhook: call.valid.webhook,
            hana_id: &call.valid.hana_id,
            contact_lead_id,
            now,
        });
    }

    let (mut new, mut existing) = (Vec::new(), Vec::new());
    for entity in working.values() {
        if entity.is_new {
            new.push(Encoded::new(entity));
        } else {
            existing.push(Encoded::new(entity));
        }
    }
    insert_entities::<E, T>(transaction, sql, &new, now).await?;
    let links = new
        .iter()
        .map(|entity| NewLink {
            entity_type: E::ENTITY_TYPE.as_str(),
            entity_id: entity.id.to_owned(),
            kind: E::HANA_LINK_KIND,
            remote_id: entity.hana_id.to_owned(),
        })
        .collect();
    let update = sql.render(&if E::HAS_CONTACT {
        format!(
            "UPDATE {} SET body = ?, updated_at = ?, deleted_at = ?, contact_lead_id = ? WHERE id = ?",
            E::TABLE
        )
    } else {
        format!(
            "UPDATE {} SET body = ?, updated_at = ?, deleted_at = ? WHERE id = ?",
            E::TABLE
        )
    });
    for entity in &existing {
        let mut params = vec![
            Param::Blob(&entity.body),
            Param::Int(now),
            Param::OptionalInt(entity.deleted_at),
        ];
        if E::HAS_CONTACT {
            params.push(Param::OptionalText(entity.contact_lead_id.as_deref()));
        }
        params.push(Param::Text(entity.id));
        transaction.execute(&update, &params).await?;
    }
    Ok(links)
}

/// Inserts new entities. Another replica inserting one of them first is a
/// [`IngestError::Conflict`]: the group is retried and then finds it.
async fn insert_entities<E: CanonicalEntity, T: GroupTransaction>(
    transaction: &mut T,
    sql: Sql,
    new: &[Encoded<'_>],
    now: i64,
) -> Result<(), IngestError> {
    let head = if E::HAS_CONTACT {
        format!(
            "INSERT INTO {} (id, source_key, body, deleted_at, contact_lead_id, created_at, updated_at)",
            E::TABLE
        )
    } else {
        format!(
            "INSERT INTO {} (id, source_key, body, deleted_at, created_at, updated_at)",
            E::TABLE
        )
    };
    let statement = Repeated {
        head: &head,
        row: if E::HAS_CONTACT {
            "(?, ?, ?, ?, ?, ?, ?)"
        } else {
            "(?, ?, ?, ?, ?, ?)"
        },
        // SQLite keeps no UNIQUE on the key (migration 0006): its one writer looked every key
        // up in this transaction. Postgres replicas race for a key; the loser rolls back.
        tail: match sql.0 {
            Backend::Sqlite => "",
            Backend::Postgres => "ON CONFLICT (source_key) DO NOTHING",
        },
        returning: Some(Returning {
            columns: "id",
            params: &[0],
        }),
    };
    let inserted = for_rows(
        transaction,
        sql,
        &statement,
        new,
        &[Column::Text],
        |entity, params| {
            params.extend([
                Param::Text(entity.id),
                Param::Text(entity.source_key),
                Param::Blob(&entity.body),
                Param::OptionalInt(entity.deleted_at),
            ]);
            if E::HAS_CONTACT {
                params.push(Param::OptionalText(entity.contact_lead_id.as_deref()));
            }
            params.extend([Param::Int(now), Param::Int(now)]);
        },
    )
    .await?;
    if inserted.len() != new.len() {
        return Err(IngestError::Conflict);
    }
    Ok(())
}

/// The link of a new entity to the Hana record that created it.
struct NewLink {
    entity_type: &'static str,
    entity_id: String,
    kind: &'static str,
    remote_id: String,
}

/// Links new entities to their Hana records.
static LINKS: Repeated<'static> = Repeated {
    head: "INSERT INTO links (entity_type, entity_id, system, kind, remote_id, linked_at)",
    row: "(?, ?, 'hana', ?, ?, ?)",
    tail: "ON CONFLICT DO NOTHING",
    returning: None,
};

/// A job to record.
struct NewJob<'a> {
    id: String,
    call: &'a Accepted<'a>,
    planned: routes::PlannedJob,
}

/// How long an update's jobs wait before they are due. Hana sends a burst of updates when an
/// agent edits several attributes in a row; the first of them to run sends the entity's state
/// then, and the ones still pending behind it are coalesced into it, so a burst arriving within
/// this window costs one call per CRM instead of one per update. Creates and deletes run at once.
const UPDATE_SETTLE_MS: i64 = 1000;

fn settle_ms(kind: HanaEventKind) -> i64 {
    match kind {
        HanaEventKind::LeadUpdated | HanaEventKind::OpportunityUpdated => UPDATE_SETTLE_MS,
        _ => 0,
    }
}

/// The jobs of the default flows for every new event.
fn new_jobs<'a>(fresh: &[&'a Accepted<'a>]) -> Vec<NewJob<'a>> {
    let mut jobs = Vec::new();
    for call in fresh {
        for planned in call.plan.iter().copied() {
            jobs.push(NewJob {
                id: new_id("job"),
                call,
                planned,
            });
        }
    }
    jobs
}

/// Records jobs.
static JOBS: Repeated<'static> = Repeated {
    head: "INSERT INTO jobs (id, event_id, target, operation, entity_type, entity_id, trace_context, \
           next_attempt_at, created_at, updated_at, state, attempts, last_error)",
    row: "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, '')",
    tail: "",
    returning: None,
};

/// The inserts that nothing later in a group reads: calls kept in quarantine, Hana
/// applications, links of new entities and jobs. SQLite runs them row by row, like every other
/// statement. On Postgres they are one statement at the end of the group, each but the last a
/// data-modifying `WITH` part: every statement is a round trip, which took 120–230 µs on loopback
/// beside the server's own work (measured: the applications insert, which changes nothing, took
/// 117 µs a group, `BEGIN` 227 µs).
#[derive(Default)]
struct Tail<'a> {
    parts: Vec<StatementRows<'static, 'a>>,
}

impl<'a> Tail<'a> {
    /// Adds `statement` over `rows`, unless there are none.
    fn add<R>(
        &mut self,
        statement: &'static Repeated<'static>,
        rows: &'a [R],
        params_of: impl Fn(&'a R, &mut Vec<Param<'a>>),
    ) {
        if !rows.is_empty() {
            self.parts
                .push(StatementRows::collect(statement, rows, params_of));
        }
    }

    /// Runs every insert added.
    async fn run<T: GroupTransaction>(
        self,
        transaction: &mut T,
        sql: Sql,
    ) -> Result<(), IngestError> {
        match sql.0 {
            Backend::Sqlite => {
                for part in self.parts {
                    let text = Sql::one_row(part.statement);
                    for row in part.each_row()? {
                        transaction.execute(&text, row).await?;
                    }
                }
                Ok(())
            }
            Backend::Postgres => {
                let mut texts = Vec::with_capacity(self.parts.len());
                let mut params = Vec::new();
                for part in self.parts {
                    let (text, arrays) = part.unnested(params.len())?;
                    texts.push(text);
                    params.extend(arrays);
                }
                let Some(last) = texts.pop() else {
                    return Ok(());
                };
                let text = if texts.is_empty() {
                    last
                } else {
                    let parts: Vec<String> = texts
                        .iter()
                        .enumerate()
                        .map(|(index, text)| format!("w{} AS ({text})", index + 1))
                        .collect();
                    format!("WITH {} {last}", parts.join(", "))
                };
                transaction.execute(&text, &params).await?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_on_postgres_and_anonymous_on_sqlite() {
        let template = "(?, 'hana', ?)";
        assert_eq!(Sql(Backend::Postgres).render(template), "($1, 'hana', $2)");
        assert_eq!(Sql(Backend::Sqlite).render(template), template);
        assert_eq!(
            Sql(Backend::Postgres).render("? ? ? ? ? ? ? ? ? ?"),
            "$1 $2 $3 $4 $5 $6 $7 $8 $9 $10"
        );
    }

    static EVENTS: Repeated<'static> = Repeated {
        head: "INSERT INTO events (id, source, raw_body, received_at)",
        row: "(?, 'hana', ?, ?)",
        tail: "ON CONFLICT DO NOTHING",
        returning: Some(Returning {
            columns: "id",
            params: &[0],
        }),
    };

    /// Params of `rows` event rows, as `for_rows` collects them.
    fn event_params(rows: usize) -> Vec<Param<'static>> {
        (0..rows)
            .flat_map(|row| {
                [
                    Param::Text("evt"),
                    Param::Blob(b"{}"),
                    Param::OptionalInt((row % 2 == 0).then_some(7)),
                ]
            })
            .collect()
    }

    #[test]
    fn sqlite_writes_a_row_per_statement() {
        // Without `RETURNING`: what SQLite returns comes from the row's parameters.
        assert_eq!(
            Sql::one_row(&EVENTS),
            "INSERT INTO events (id, source, raw_body, received_at) VALUES (?, 'hana', ?, ?) \
             ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            Sql(Backend::Sqlite).lookup(&Lookup {
                head: "SELECT id FROM leads WHERE source_key",
                tail: "",
            }),
            "SELECT id FROM leads WHERE source_key IN (?)"
        );
    }

    /// SQLite returns the parameters of the rows its statements wrote, and nothing of a row that
    /// conflicted with one already stored.
    #[tokio::test]
    async fn sqlite_returns_the_rows_it_wrote() -> Result<(), Box<dyn std::error::Error>> {
        let connection = rusqlite::Connection::open_in_memory()?;
        connection.execute_batch(
            "CREATE TABLE events (id TEXT PRIMARY KEY, source TEXT NOT NULL, raw_body BLOB, \
             received_at INTEGER); INSERT INTO events VALUES ('evt_2', 'hana', x'', 0);",
        )?;
        let ids = ["evt_1", "evt_2", "evt_3"];
        let returned = for_rows(
            &mut super::super::sql::SqliteTransaction::new(&connection),
            Sql(Backend::Sqlite),
            &EVENTS,
            &ids,
            &[Column::Text],
            |id, params| {
                params.extend([
                    Param::Text(id),
                    Param::Blob(b"{}"),
                    Param::OptionalInt(None),
                ]);
            },
        )
        .await?;
        let returned: Vec<String> = returned
            .into_iter()
            .flatten()
            .map(Cell::into_text)
            .collect();
        assert_eq!(returned, ["evt_1", "evt_3"]);
        let stored: i64 =
            connection.query_row("SELECT count(*) FROM events", [], |row| row.get(0))?;
        assert_eq!(stored, 3);
        Ok(())
    }

    /// Postgres keeps a statement prepared only while its text repeats: a group of any size must
    /// give the same text.
    #[test]
    fn postgres_binds_a_group_as_arrays_in_one_text_whatever_its_size() {
        let text_of = |rows: usize| -> Result<String, IngestError> {
            let arrays = into_columns(event_params(rows), rows)?;
            let types: Vec<&str> = arrays.iter().filter_map(Param::array_type).collect();
            Ok(Sql::unnested(&EVENTS, &types, 0))
        };
        let one = text_of(1).expect("one row lines up");
        assert_eq!(
            one,
            "INSERT INTO events (id, source, raw_body, received_at) SELECT r.c1, 'hana', r.c2, \
             r.c3 FROM UNNEST($1::text[], $2::bytea[], $3::int8[]) AS r(c1, c2, c3) \
             ON CONFLICT DO NOTHING RETURNING id"
        );
        for rows in [2, 17, 256] {
            assert_eq!(text_of(rows).expect("the rows line up"), one, "{rows} rows");
        }
        assert_eq!(
            Sql(Backend::Postgres).lookup(&Lookup {
                head: "SELECT id FROM leads WHERE source_key",
                tail: " FOR UPDATE",
            }),
            "SELECT id FROM leads WHERE source_key = ANY($1::text[]) FOR UPDATE"
        );
    }

    /// A transaction that records what it is asked to run.
    #[derive(Default)]
    struct Recorded {
        statements: Vec<(String, usize)>,
    }

    impl GroupTransaction for Recorded {
        async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, IngestError> {
            self.statements.push((sql.to_owned(), params.len()));
            Ok(1)
        }

        async fn fetch(
            &mut self,
            sql: &str,
            params: &[Param<'_>],
            _columns: &[Column],
        ) -> Result<Vec<Vec<Cell>>, IngestError> {
            self.statements.push((sql.to_owned(), params.len()));
            Ok(Vec::new())
        }
    }

    /// Runs a tail of two applications and three events, and nothing for an empty part.
    async fn run_tail(backend: Backend) -> Result<Vec<(String, usize)>, IngestError> {
        let applications = ["app-1", "app-2"];
        let events = event_params(3);
        let event_rows: Vec<&[Param<'_>]> = events.chunks(3).collect();
        let no_rows: [&str; 0] = [];
        let mut tail = Tail::default();
        tail.add(&APPLICATIONS, &applications, |application, params| {
            params.push(Param::Text(application));
        });
        tail.add(&LINKS, &no_rows, |_, _| {});
        tail.add(&EVENTS, &event_rows, |row, params| {
            params.extend(row.iter().cloned());
        });
        let mut recorded = Recorded::default();
        tail.run(&mut recorded, Sql(backend)).await?;
        Ok(recorded.statements)
    }

    #[tokio::test]
    async fn postgres_runs_a_tail_as_one_statement_with_its_parts_numbered_in_turn() {
        let statements = run_tail(Backend::Postgres).await.expect("the tail runs");
        assert_eq!(
            statements,
            vec![(
                "WITH w1 AS (INSERT INTO hana_applications (application_id) SELECT r.c1 FROM \
                 UNNEST($1::text[]) AS r(c1) ON CONFLICT (application_id) DO NOTHING) \
                 INSERT INTO events (id, source, raw_body, received_at) SELECT r.c1, 'hana', \
                 r.c2, r.c3 FROM UNNEST($2::text[], $3::bytea[], $4::int8[]) AS r(c1, c2, c3) \
                 ON CONFLICT DO NOTHING RETURNING id"
                    .to_owned(),
                4
            )]
        );
    }

    #[tokio::test]
    async fn sqlite_runs_a_tail_row_by_row() {
        let statements = run_tail(Backend::Sqlite).await.expect("the tail runs");
        let applications = "INSERT INTO hana_applications (application_id) VALUES (?) \
                            ON CONFLICT (application_id) DO NOTHING";
        let events = Sql::one_row(&EVENTS);
        assert_eq!(
            statements,
            vec![
                (applications.to_owned(), 1),
                (applications.to_owned(), 1),
                (events.clone(), 3),
                (events.clone(), 3),
                (events, 3),
            ]
        );
    }

    #[test]
    fn columns_keep_each_rows_values_in_order() {
        let arrays = into_columns(event_params(3), 3).expect("the rows line up");
        assert!(matches!(&arrays[0], Param::TextArray(ids) if ids == &[Some("evt"); 3]));
        assert!(matches!(&arrays[1], Param::BlobArray(bodies) if bodies.len() == 3));
        assert!(matches!(&arrays[2], Param::IntArray(times) if times == &[Some(7), None, Some(7)]));
    }

    #[test]
    fn rows_that_do_not_line_up_are_refused() {
        let mut uneven = event_params(2);
        uneven.pop();
        assert!(into_columns(uneven, 2).is_err());
        let mut mixed = event_params(2);
        mixed[3] = Param::Int(1);
        assert!(into_columns(mixed, 2).is_err());
    }
}
