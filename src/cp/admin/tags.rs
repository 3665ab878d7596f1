//! Kong's `GET /tags` and `GET /tags/{tag}` (`kong/api/routes/tags.lua`, the generic collection
//! endpoint for `/tags`): every tagged entity as `{entity_id, entity_name, tag}` rows, across
//! all entity types, paginated by `size` and `offset`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{AdminState, error_response, parse_size, query_of, urlencode};
use crate::cp::store::{StoreError, TagPage};

/// `GET /tags`. Kong's `next` is `/tags?offset=…` followed by the request's `tags` and `size`
/// arguments (`get_collection_endpoint` in `kong/api/endpoints.lua`); `?tags=` filters nothing.
pub(super) async fn all(State(state): State<Arc<AdminState>>, req: Request) -> Response {
    let query = query_of(&req);
    let size = match parse_size(&query) {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let page = state
        .store
        .list_tags(None, size, query.get("offset").map(String::as_str))
        .await;
    answer(page, |offset| {
        let mut next = format!("/tags?offset={}", urlencode(offset));
        if let Some(t) = query.get("tags") {
            next.push_str(&format!("&tags={}", urlencode(t)));
        }
        if let Some(s) = query.get("size") {
            next.push_str(&format!("&size={s}"));
        }
        next
    })
}

/// `GET /tags/{tag}`. The tag must be a valid tag (Kong's `page_by_tag` validates it: 400,
/// code 10 "invalid unique tag"); `next` carries only the offset, on the path as requested.
pub(super) async fn by_tag(State(state): State<Arc<AdminState>>, req: Request) -> Response {
    let query = query_of(&req);
    let path = req.uri().path().to_owned();
    let raw = path.strip_prefix("/tags/").unwrap_or_default();
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    let tag = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.utf8_error().valid_up_to() + 1;
            return invalid_tag(&format!(
                "invalid utf-8 character sequence detected at position {at}"
            ));
        }
    };
    if let Err(msg) = crate::schema::validate_named("tag", &Value::String(tag.clone())) {
        return invalid_tag(&msg);
    }
    let size = match parse_size(&query) {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let page = state
        .store
        .list_tags(Some(&tag), size, query.get("offset").map(String::as_str))
        .await;
    answer(page, |offset| {
        format!("{path}?offset={}", urlencode(offset))
    })
}

fn invalid_tag(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"code": 10, "name": "invalid unique tag", "message": message})),
    )
        .into_response()
}

fn answer(page: Result<TagPage, StoreError>, next_of: impl FnOnce(&str) -> String) -> Response {
    let page = match page {
        Ok(p) => p,
        Err(StoreError::BadRequest(m)) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"code": 7, "name": "invalid offset", "message": m})),
            )
                .into_response();
        }
        Err(e) => return error_response(e),
    };
    let data: Vec<Value> = page
        .data
        .into_iter()
        .map(|r| json!({"entity_id": r.entity_id, "entity_name": r.entity_name, "tag": r.tag}))
        .collect();
    let mut body = json!({ "data": data, "next": Value::Null });
    if let Some(offset) = page.next_offset {
        body["next"] = Value::String(next_of(&offset));
        body["offset"] = Value::String(offset);
    }
    Json(body).into_response()
}
