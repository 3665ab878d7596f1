//! What the auth plugins (jwt, key-auth, basic-auth) share: setting the consumer and its
//! headers, and the anonymous consumer of the "logical OR" flow.
//!
//! Kong: `set_consumer` and `set_anonymous_consumer` in each plugin's handler (`access.lua`
//! for basic-auth), headers from `kong/constants.lua`.

use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;

use super::request::{Consumer, Credential, Ctx, error_response};
use super::table::Plugins;

/// `X-Consumer-ID`.
const CONSUMER_ID: &str = "x-consumer-id";
/// `X-Consumer-Custom-ID`.
const CONSUMER_CUSTOM_ID: &str = "x-consumer-custom-id";
/// `X-Consumer-Username`.
const CONSUMER_USERNAME: &str = "x-consumer-username";
/// `X-Credential-Identifier`.
const CREDENTIAL_IDENTIFIER: &str = "x-credential-identifier";
/// `X-Anonymous-Consumer`.
const ANONYMOUS: &str = "x-anonymous-consumer";

/// Authenticates the request (`kong.client.authenticate`) and sets or clears the consumer
/// headers to the upstream, as every auth plugin's `set_consumer` does.
pub(super) fn set_consumer(ctx: &mut Ctx, consumer: Arc<Consumer>, credential: Option<Credential>) {
    ctx.set_header(CONSUMER_ID, &consumer.id);
    match &consumer.custom_id {
        Some(custom_id) => ctx.set_header(CONSUMER_CUSTOM_ID, custom_id),
        None => {
            ctx.headers.remove(CONSUMER_CUSTOM_ID);
        }
    }
    match &consumer.username {
        Some(username) => ctx.set_header(CONSUMER_USERNAME, username),
        None => {
            ctx.headers.remove(CONSUMER_USERNAME);
        }
    }
    match &credential {
        Some(credential) => {
            ctx.set_header(CREDENTIAL_IDENTIFIER, &credential.identifier);
            ctx.headers.remove(ANONYMOUS);
        }
        None => {
            ctx.headers.remove(CREDENTIAL_IDENTIFIER);
            ctx.set_header(ANONYMOUS, "true");
        }
    }
    ctx.consumer = Some(consumer);
    ctx.credential = credential;
}

/// Sets the anonymous consumer `anonymous` (an id or a username) after a failed
/// authentication; 500 when it does not exist, with Kong's message.
pub(super) fn set_anonymous(
    plugins: &Plugins,
    ctx: &mut Ctx,
    anonymous: &str,
) -> Option<Response<Full<Bytes>>> {
    match plugins.ws_data(&ctx.ws_id).load_consumer(anonymous) {
        Some(consumer) => {
            set_consumer(ctx, consumer, None);
            None
        }
        None => {
            let message = format!("anonymous consumer {anonymous} is configured but doesn't exist");
            tracing::error!("{message}");
            Some(error_response(500, &message, &[]))
        }
    }
}

/// The credential's consumer, for a credential that authenticated; `None` when the
/// consumer is missing from the configuration (the credential's foreign key dangles).
pub(super) fn credential_consumer(
    plugins: &Plugins,
    ctx: &Ctx,
    credential: &Credential,
) -> Option<Arc<Consumer>> {
    plugins
        .ws_data(&ctx.ws_id)
        .consumers_by_id
        .get(&credential.consumer_id)
        .cloned()
}
