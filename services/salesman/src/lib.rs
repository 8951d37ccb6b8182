//! The SalesMan adapter: SalesMan's leads API v1 behind `leadrelay.salesman.v1.SalesManAdapterService`
//! and the canonical `leadrelay.v1.CrmSyncService`.

pub mod client;
pub mod sync;

use std::{collections::HashSet, pin::Pin, sync::Arc};

use leadrelay_proto::{
    salesman::v1::{
        AddLeadRequest, AddLeadResponse, GetLeadRequest, GetLeadResponse, GetLeadStatsRequest,
        GetLeadStatsResponse, ListLeadsRequest, ListLeadsResponse, ListOrderDirection,
        sales_man_adapter_service_server::{SalesManAdapterService, SalesManAdapterServiceServer},
    },
    service_names,
    v1::crm_sync_service_server::CrmSyncServiceServer,
};
use leadrelay_runtime::{
    Settings,
    adapter::Credentials,
    grpc::{GrpcServer, GrpcServerError},
};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, service::Routes};

use self::client::{
    DEFAULT_TIMEOUT, Direction, ListFilter, PAGE_SIZE, SalesManClient, SalesManError,
};

/// SalesMan's native gRPC face.
#[derive(Clone, Debug)]
pub struct SalesManAdapter {
    credentials: Credentials,
    client: Option<Arc<SalesManClient>>,
    /// Hana attributes → lead parameters, from the config file.
    fields: Vec<leadrelay_runtime::mappings::FieldMapping>,
}

impl SalesManAdapter {
    /// The adapter for the SalesMan settings; without URL, login and API key every RPC answers
    /// FAILED_PRECONDITION naming what to set.
    pub fn from_settings(settings: &Settings) -> Result<Self, SalesManError> {
        let salesman = &settings.salesman;
        let client = match (&salesman.api_url, &salesman.login, &salesman.api_key) {
            (Some(url), Some(login), Some(api_key)) => Some(Arc::new(SalesManClient::new(
                url,
                login.clone(),
                api_key.clone(),
                DEFAULT_TIMEOUT,
            )?)),
            _ => None,
        };
        Ok(Self {
            credentials: Credentials::new("SalesMan", settings.salesman_missing()),
            client,
            fields: settings.mappings.salesman.clone(),
        })
    }

    /// Whether URL, login and API key are set.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The adapter's gRPC routes: its native service and `CrmSyncService`.
    pub fn routes(self) -> Routes {
        let sync = sync::SalesManSync::new(
            self.credentials.clone(),
            self.client.clone(),
            self.fields.clone(),
        );
        Routes::new(SalesManAdapterServiceServer::new(self))
            .add_service(CrmSyncServiceServer::new(sync))
    }

    fn client(&self) -> Result<Arc<SalesManClient>, Status> {
        self.credentials.require()?;
        self.client
            .clone()
            .ok_or_else(|| Status::failed_precondition("SalesMan is not configured"))
    }
}

/// The stream `ListLeads` answers with.
pub type LeadStream = Pin<Box<dyn Stream<Item = Result<ListLeadsResponse, Status>> + Send>>;

fn date(text: &str, what: &str) -> Result<String, Status> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(String::new());
    }
    let valid = text.len() == 10
        && text.bytes().enumerate().all(|(position, byte)| {
            if position == 4 || position == 7 {
                byte == b'-'
            } else {
                byte.is_ascii_digit()
            }
        });
    if valid {
        Ok(text.to_owned())
    } else {
        Err(Status::invalid_argument(format!(
            "{what} '{text}' is not a YYYY-MM-DD date"
        )))
    }
}

#[tonic::async_trait]
impl SalesManAdapterService for SalesManAdapter {
    type ListLeadsStream = LeadStream;

    async fn add_lead(
        &self,
        request: Request<AddLeadRequest>,
    ) -> Result<Response<AddLeadResponse>, Status> {
        let client = self.client()?;
        let lead = request.into_inner();
        if [&lead.title, &lead.email, &lead.phone]
            .iter()
            .all(|value| value.trim().is_empty())
        {
            return Err(Status::invalid_argument(
                "a lead needs at least a title (the visitor's name), an email or a phone",
            ));
        }
        let (id, text) = client.add(&lead).await?;
        Ok(Response::new(AddLeadResponse { id, text }))
    }

    async fn get_lead(
        &self,
        request: Request<GetLeadRequest>,
    ) -> Result<Response<GetLeadResponse>, Status> {
        let client = self.client()?;
        let id = request.get_ref().id;
        if id <= 0 {
            return Err(Status::invalid_argument(
                "id is required (a positive SalesMan lead id)",
            ));
        }
        let lead = client.info(id).await?;
        Ok(Response::new(GetLeadResponse { lead: Some(lead) }))
    }

    async fn list_leads(
        &self,
        request: Request<ListLeadsRequest>,
    ) -> Result<Response<Self::ListLeadsStream>, Status> {
        let client = self.client()?;
        let request = request.into_inner();
        let filter = ListFilter {
            order: request.order.clone(),
            direction: match request.direction() {
                ListOrderDirection::Unspecified => Direction::Default,
                ListOrderDirection::NewestFirst => Direction::NewestFirst,
                ListOrderDirection::OldestFirst => Direction::OldestFirst,
            },
            date_start: date(&request.date_start, "date_start")?,
            date_end: date(&request.date_end, "date_end")?,
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(PAGE_SIZE);
        tokio::spawn(async move {
            let mut page = request.start_page;
            let mut seen = HashSet::new();
            loop {
                let leads = match client.list_page(page, &filter).await {
                    Ok(leads) => leads,
                    Err(error) => {
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                };
                let full = leads.len() >= PAGE_SIZE;
                let mut new = 0;
                for lead in leads {
                    if !seen.insert(lead.id) {
                        continue;
                    }
                    new += 1;
                    let item = ListLeadsResponse {
                        lead: Some(lead),
                        page,
                    };
                    if sender.send(Ok(item)).await.is_err() {
                        // The caller went away.
                        return;
                    }
                }
                if !full {
                    return;
                }
                if new == 0 {
                    // A server that ignores `offset` (the public v1 code does) sends the same
                    // page again: everything it has was streamed.
                    tracing::warn!(
                        page,
                        "salesman sent a page already seen; it ignores offset, so the list ends here"
                    );
                    return;
                }
                page += 1;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn get_lead_stats(
        &self,
        _request: Request<GetLeadStatsRequest>,
    ) -> Result<Response<GetLeadStatsResponse>, Status> {
        let client = self.client()?;
        let users = client.stat().await?;
        Ok(Response::new(GetLeadStatsResponse { users }))
    }
}

/// The SalesMan adapter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The HTTP client could not be built from the settings.
    #[error("cannot set up the SalesMan client: {0}")]
    Client(#[from] SalesManError),
    /// The gRPC server failed.
    #[error(transparent)]
    Grpc(#[from] GrpcServerError),
}

/// Serves the SalesMan adapter on `listener` until `shutdown` is cancelled.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let adapter = SalesManAdapter::from_settings(settings)?;
    GrpcServer::new(
        "salesman-adapter",
        adapter.routes(),
        &[service_names::SALESMAN_ADAPTER, service_names::CRM_SYNC],
    )
    .serve(listener, shutdown)
    .await?;
    Ok(())
}
