//! Routing from the config file: which systems a Hana event is synced to, per event kind and,
//! optionally, per Hana application.
//!
//! ```toml
//! # Leads of every application go to Pipedrive only.
//! [[routes]]
//! events = ["lead.created", "lead.updated", "lead.deleted"]
//! targets = ["pipedrive"]
//!
//! # One application's tickets are not synced at all.
//! [[routes]]
//! app = "dbd9a5f7-b3c4-45bb-a8eb-2b8e10bff8c2"
//! events = ["ticket.created", "ticket.updated", "ticket.deleted"]
//! targets = []
//! ```
//!
//! A route naming the event's application wins over one for every application; an event no route
//! names follows the default flows (leads to SalesMan and Pipedrive, tickets to Pipedrive).
//! Leads can go to `salesman` and `pipedrive`; tickets only to `pipedrive` (SalesMan's leads API
//! has no deals). A mistake stops start-up naming the file, the line and the reason.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfigError, config::ConfigText};

/// The event names a route may list (`ticket.*` and `opportunity.*` are the same events).
const LEAD_EVENTS: [&str; 3] = ["lead.created", "lead.updated", "lead.deleted"];
const TICKET_EVENTS: [&str; 3] = ["ticket.created", "ticket.updated", "ticket.deleted"];

/// One route: the targets of some events, for one application or all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The Hana application it is for; `None` for every application.
    pub app: Option<String>,
    /// Event names, `ticket.*` for tickets.
    pub events: Vec<String>,
    /// Target systems: "salesman", "pipedrive".
    pub targets: Vec<String>,
}

/// The routes of the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes(pub Vec<Route>);

impl Routes {
    /// The targets for `event` (`lead.created`, `ticket.updated`, …) of `app`; `None` when no
    /// route names it (the default flows apply).
    pub fn targets(&self, app: &str, event: &str) -> Option<&[String]> {
        let event = canonical_event(event);
        let named = |route: &&Route| route.events.contains(&event);
        self.0
            .iter()
            .filter(|route| route.app.as_deref() == Some(app))
            .find(named)
            .or_else(|| {
                self.0
                    .iter()
                    .filter(|route| route.app.is_none())
                    .find(named)
            })
            .map(|route| route.targets.as_slice())
    }
}

/// `opportunity.*` as `ticket.*`.
fn canonical_event(event: &str) -> String {
    match event.strip_prefix("opportunity.") {
        Some(action) => format!("ticket.{action}"),
        None => event.to_owned(),
    }
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    app: Option<Spanned<String>>,
    events: Spanned<Vec<Spanned<String>>>,
    targets: Spanned<Vec<Spanned<String>>>,
}

/// The routes in the config file `text` (read from `path`).
pub fn parse(path: &Path, text: &str) -> Result<Routes, ConfigError> {
    let config = ConfigText { path, text };
    let at = |span| config.at(span);
    let file: File = config.deserialize()?;
    let mut routes = Vec::new();
    for route in file.routes {
        let route = route.into_inner();
        if route.events.get_ref().is_empty() {
            return Err(ConfigError::new(
                at(route.events.span()),
                "a route must name at least one event",
            ));
        }
        let mut events = Vec::new();
        let mut takes_tickets = false;
        for event in route.events.into_inner() {
            let name = canonical_event(event.get_ref().trim());
            if TICKET_EVENTS.contains(&name.as_str()) {
                takes_tickets = true;
            } else if !LEAD_EVENTS.contains(&name.as_str()) {
                return Err(ConfigError::new(
                    at(event.span()),
                    format!(
                        "unknown event '{}': use {} or {}",
                        event.get_ref(),
                        LEAD_EVENTS.join(", "),
                        TICKET_EVENTS.join(", ")
                    ),
                ));
            }
            events.push(name);
        }
        let mut targets = Vec::new();
        for target in route.targets.into_inner() {
            let name = target.get_ref().trim().to_ascii_lowercase();
            match name.as_str() {
                "pipedrive" => {}
                "salesman" if takes_tickets => {
                    return Err(ConfigError::new(
                        at(target.span()),
                        "salesman cannot take ticket events: SalesMan's leads API has no deals",
                    ));
                }
                "salesman" => {}
                other => {
                    return Err(ConfigError::new(
                        at(target.span()),
                        format!("unknown target '{other}': use salesman or pipedrive"),
                    ));
                }
            }
            if !targets.contains(&name) {
                targets.push(name);
            }
        }
        let app = match route.app {
            Some(app) if app.get_ref().trim().is_empty() => {
                return Err(ConfigError::new(
                    at(app.span()),
                    "app is empty: give a Hana application id, or leave app out for every application",
                ));
            }
            Some(app) => Some(app.into_inner().trim().to_owned()),
            None => None,
        };
        routes.push(Route {
            app,
            events,
            targets,
        });
    }
    Ok(Routes(routes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Routes, ConfigError> {
        parse(Path::new("leadrelay.toml"), text)
    }

    #[test]
    fn an_application_s_route_wins_over_the_general_one() -> Result<(), ConfigError> {
        let routes = parsed(
            r#"
[[routes]]
events = ["lead.created", "lead.updated"]
targets = ["pipedrive"]

[[routes]]
app = "app-2"
events = ["lead.created"]
targets = ["salesman", "pipedrive"]

[[routes]]
events = ["ticket.created"]
targets = []
"#,
        )?;
        assert_eq!(
            routes.targets("app-1", "lead.created"),
            Some(&["pipedrive".to_owned()][..])
        );
        assert_eq!(
            routes.targets("app-2", "lead.created"),
            Some(&["salesman".to_owned(), "pipedrive".to_owned()][..])
        );
        assert_eq!(
            routes.targets("app-2", "lead.updated"),
            Some(&["pipedrive".to_owned()][..])
        );
        assert_eq!(
            routes.targets("app-1", "opportunity.created"),
            Some(&[][..])
        );
        assert_eq!(routes.targets("app-1", "lead.deleted"), None);
        Ok(())
    }

    #[test]
    fn mistakes_name_the_line_and_the_reason() {
        let error = parsed("[[routes]]\nevents = [\"lead.created\"]\ntargets = [\"salesmn\"]\n")
            .expect_err("unknown target");
        assert_eq!(error.source_name, "leadrelay.toml line 3");
        assert!(
            error.message.contains("unknown target 'salesmn'"),
            "{}",
            error.message
        );
        let error = parsed("[[routes]]\nevents = [\"ticket.created\"]\ntargets = [\"salesman\"]\n")
            .expect_err("no deals in SalesMan");
        assert_eq!(error.source_name, "leadrelay.toml line 3");
        let error = parsed("[[routes]]\n\nevents = [\"lead.moved\"]\ntargets = []\n")
            .expect_err("unknown event");
        assert_eq!(error.source_name, "leadrelay.toml line 3");
        let error = parsed("[[routes]]\nevents = [\"lead.created\"]\n").expect_err("no targets");
        assert!(error.message.contains("targets"), "{}", error.message);
    }
}
