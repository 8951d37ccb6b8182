//! The SalesMan adapter's native RPCs over real gRPC, against a wiremock SalesMan that answers
//! exactly as the leads API v1 document and the SalesMan source show: form-encoded requests,
//! errors at HTTP 200 (some without a `result` key), strings for every value, Cyrillic text, and
//! "not found" for an empty page.

mod common;

use std::collections::HashMap;

use leadrelay_proto::salesman::v1::{
    AddLeadRequest, GetLeadRequest, GetLeadStatsRequest, LeadResult, LeadStatus, ListLeadsRequest,
    sales_man_adapter_service_client::SalesManAdapterServiceClient,
};
use leadrelay_testkit::salesman::{self, Seen, v1};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};
use wiremock::{MockServer, ResponseTemplate};

const LOGIN: &str = "vladislav@isaler.ru";
const API_KEY: &str = "aMgiCQyj8bCToNc47BZZYrRICoWSIl";

async fn fake<F>(answer: F) -> (MockServer, Seen)
where
    F: Fn(&HashMap<String, String>) -> ResponseTemplate + Send + Sync + 'static,
{
    let server = MockServer::start().await;
    let seen = salesman::mount(&server, LOGIN, API_KEY, answer).await;
    (server, seen)
}

async fn serve_adapter(
    server: &MockServer,
    api_key: &str,
) -> SalesManAdapterServiceClient<Channel> {
    serve_adapter_as(server, LOGIN, api_key).await
}

async fn serve_adapter_as(
    server: &MockServer,
    login: &str,
    api_key: &str,
) -> SalesManAdapterServiceClient<Channel> {
    SalesManAdapterServiceClient::new(common::serve(server.uri(), login, api_key).await)
}

#[tokio::test]
async fn add_sends_every_documented_parameter_and_reads_the_new_id() {
    let (server, seen) = fake(|fields| match fields.get("action").map(String::as_str) {
        Some("add") => v1(&json!({"result":{"text":"Success","id":940}})),
        _ => v1(&json!({"result":"Error","error":{"code":"402","text":"Неизвестный метод"}})),
    })
    .await;
    let mut adapter = serve_adapter(&server, API_KEY).await;
    let request = AddLeadRequest {
        title: "Андреев Владислав".to_owned(),
        email: "vladislav@god.ry".to_owned(),
        phone: "+79001234567".to_owned(),
        company: "SalesMan".to_owned(),
        description: "The best crm practice".to_owned(),
        ip: "127.0.0.1".to_owned(),
        country: "Ruusia".to_owned(),
        city: "Perm".to_owned(),
        path: "Test Path".to_owned(),
        partner: "partner.example".to_owned(),
        user: "manager@isaler.ru".to_owned(),
        utm_source: "google".to_owned(),
        utm_medium: "cpc".to_owned(),
        utm_campaign: "winter".to_owned(),
        utm_term: "crm".to_owned(),
        utm_content: "banner".to_owned(),
    };
    let added = adapter
        .add_lead(request)
        .await
        .expect("AddLead")
        .into_inner();
    assert_eq!((added.id, added.text.as_str()), (940, "Success"));
    let fields = seen.lock().expect("seen")[0].clone();
    for (name, value) in [
        ("action", "add"),
        ("title", "Андреев Владислав"),
        ("email", "vladislav@god.ry"),
        ("phone", "+79001234567"),
        ("company", "SalesMan"),
        ("description", "The best crm practice"),
        ("ip", "127.0.0.1"),
        ("country", "Ruusia"),
        ("city", "Perm"),
        ("path", "Test Path"),
        ("partner", "partner.example"),
        ("user", "manager@isaler.ru"),
        ("utm_source", "google"),
        ("utm_medium", "cpc"),
        ("utm_campaign", "winter"),
        ("utm_term", "crm"),
        ("utm_content", "banner"),
    ] {
        assert_eq!(fields.get(name).map(String::as_str), Some(value), "{name}");
    }
}

#[tokio::test]
async fn errors_arrive_at_http_200_and_map_by_meaning() {
    let (server, _) = fake(|fields| match fields.get("action").map(String::as_str) {
        // v1 add failure: no `result` key, an extra capital-E key.
        Some("add") => v1(
            &json!({"error":{"code":"1","text":"Ошибка добавления лида. Нет данных"},
                                 "Error":"Ошибка добавления лида. Нет данных"}),
        ),
        // The client/person shape of 402: no `result` key.
        Some("info") => v1(&json!({"error":{"code":"402","text":"Не известный метод"}})),
        Some("stat") => ResponseTemplate::new(500),
        _ => ResponseTemplate::new(200),
    })
    .await;
    let mut adapter = serve_adapter(&server, API_KEY).await;
    let failed = adapter
        .add_lead(AddLeadRequest {
            title: "Лид".to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("add failed");
    assert_eq!(failed.code(), Code::Unknown);
    assert!(
        failed.message().contains("Ошибка добавления лида"),
        "{}",
        failed.message()
    );
    let unknown = adapter
        .get_lead(GetLeadRequest { id: 1 })
        .await
        .expect_err("402");
    assert_eq!(unknown.code(), Code::Unimplemented);
    let down = adapter
        .get_lead_stats(GetLeadStatsRequest {})
        .await
        .expect_err("HTTP 500");
    assert_eq!(down.code(), Code::Unavailable);
    let empty = adapter
        .list_leads(ListLeadsRequest::default())
        .await
        .expect("the stream starts")
        .into_inner()
        .next()
        .await
        .expect("one item")
        .expect_err("an empty body");
    assert_eq!(empty.code(), Code::Unavailable);
    assert!(
        empty.message().contains("empty body"),
        "{}",
        empty.message()
    );

    let mut wrong_key = serve_adapter(&server, "wrong-key").await;
    let refused = wrong_key
        .get_lead_stats(GetLeadStatsRequest {})
        .await
        .expect_err("400");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("LEADRELAY_SALESMAN_API_KEY"),
        "{}",
        refused.message()
    );

    let mut stranger = serve_adapter_as(&server, "nobody@isaler.ru", API_KEY).await;
    let unknown = stranger
        .get_lead_stats(GetLeadStatsRequest {})
        .await
        .expect_err("401");
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert!(
        unknown.message().contains("LEADRELAY_SALESMAN_LOGIN")
            && unknown.message().contains("Неизвестный пользователь"),
        "{}",
        unknown.message()
    );
}

#[tokio::test]
async fn info_reads_a_cyrillic_record_into_typed_fields() {
    let (server, seen) = fake(|fields| {
        assert_eq!(fields.get("id").map(String::as_str), Some("1583"));
        v1(&json!({"result":{"data":{
            "id":"1583","datum":"2017-08-10 08:02:51","datum_do":"2017-08-11 09:00:00","status":"3",
            "rezult":"2","title":"Магомет","email":"m@x.ru","phone":"79235552226","site":"",
            "company":"Magomet Co","description":"Нужна CRM «под ключ»","ip":"","city":"Пермь",
            "country":"Россия","iduser":"12","clientpath":"14","pid":"2724","clid":"6193","did":"0",
            "statusName":"Закрыт","rezultName":"Дубль","clientpathName":"Рекомендации клиентов",
            "userName":"Иван Петров","client":"Magomet Co","person":"Магомет","deal":null
        },"id":"1583"}}))
    })
    .await;
    let mut adapter = serve_adapter(&server, API_KEY).await;
    let lead = adapter
        .get_lead(GetLeadRequest { id: 1583 })
        .await
        .expect("GetLead")
        .into_inner()
        .lead
        .expect("a lead");
    assert_eq!(lead.id, 1583);
    assert_eq!(lead.status(), LeadStatus::Closed);
    assert_eq!(lead.result(), LeadResult::Duplicate);
    assert_eq!(lead.result_name, "Дубль");
    assert_eq!(lead.city, "Пермь");
    assert_eq!(lead.content, "Нужна CRM «под ключ»");
    assert_eq!((lead.user_id, lead.user_name.as_str()), (12, "Иван Петров"));
    assert_eq!(seen.lock().expect("seen").len(), 1);
}

#[tokio::test]
async fn list_streams_all_1050_leads_in_order_from_6_pages() {
    const TOTAL: usize = 1050;
    let (server, seen) = fake(|fields| {
        let offset: usize = fields
            .get("offset")
            .and_then(|offset| offset.parse().ok())
            .unwrap_or(0);
        let rows: Vec<Value> = (offset * 200..TOTAL.min((offset + 1) * 200))
            .map(|index| {
                json!({"id": (index + 1).to_string(), "datum": "2026-11-20 10:00:00",
                       "email": format!("lead{index}@example.ru"), "phone": "79001234567",
                       "content": "Заявка с сайта", "clid": "0", "pid": "0", "did": "0",
                       "user": "", "userName": "Не определен", "status": "0",
                       "statusName": "Открыт", "rezult": "0", "rezultName": "0",
                       "clientpath": "0", "clientpathName": null})
            })
            .collect();
        if rows.is_empty() {
            v1(&json!({"result":"Error","error":{"code":"404","text":"Не найдено"}}))
        } else {
            v1(&json!({ "data": rows }))
        }
    })
    .await;
    let mut adapter = serve_adapter(&server, API_KEY).await;
    let mut stream = adapter
        .list_leads(ListLeadsRequest {
            direction: leadrelay_proto::salesman::v1::ListOrderDirection::OldestFirst.into(),
            date_start: "2026-01-01".to_owned(),
            ..Default::default()
        })
        .await
        .expect("ListLeads")
        .into_inner();
    let mut ids = Vec::new();
    let mut pages = std::collections::BTreeSet::new();
    while let Some(item) = stream.next().await {
        let item = item.expect("a lead");
        pages.insert(item.page);
        ids.push(item.lead.expect("a lead").id);
    }
    assert_eq!(ids, (1..=1050).collect::<Vec<i64>>());
    assert_eq!(
        pages.into_iter().collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5]
    );
    let requests = seen.lock().expect("seen").clone();
    assert_eq!(requests.len(), 6, "the short sixth page ends the list");
    assert!(requests.iter().all(
        |fields| fields.get("first").map(String::as_str) == Some("old")
            && fields.get("dateStart").map(String::as_str) == Some("2026-01-01")
    ));
}

#[tokio::test]
async fn an_empty_list_is_the_end_not_a_failure_and_stats_are_typed() {
    let (server, _) = fake(|fields| match fields.get("action").map(String::as_str) {
        Some("list") => v1(&json!({"result":"Error","error":{"code":"404","text":"Не найдено"}})),
        _ => v1(&json!({"data":[
            {"title":"vladislav@isaler.ru","open":"2","processed":"1"},
            {"title":"viktor@isaler.ru","open":"0","processed":"0"}
        ]})),
    })
    .await;
    let mut adapter = serve_adapter(&server, API_KEY).await;
    let leads: Vec<_> = adapter
        .list_leads(ListLeadsRequest::default())
        .await
        .expect("ListLeads")
        .into_inner()
        .collect()
        .await;
    assert!(leads.is_empty(), "{leads:?}");
    let users = adapter
        .get_lead_stats(GetLeadStatsRequest {})
        .await
        .expect("GetLeadStats")
        .into_inner()
        .users;
    assert_eq!(users.len(), 2);
    assert_eq!(
        (users[0].login.as_str(), users[0].open, users[0].processed),
        ("vladislav@isaler.ru", 2, 1)
    );
}
