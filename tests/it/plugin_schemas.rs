//! The config schema of every plugin bundled with open-source Kong 3.10 (`kong/constants.lua`
//! `plugins`), checked against Kong's own schema files.
//!
//! Each row was derived by hand from the Kong file it cites: `DEFAULTS` gives a config (`{}`,
//! or the fields Kong requires) and the whole config Kong fills from it; `INVALID` gives a
//! config Kong refuses and Kong's error tree for the plugin entity (`fields` of the Admin API's
//! schema violation). `HANDLERS` is each plugin's `VERSION` and `PRIORITY` from its
//! `handler.lua`. Adding a case is adding a row.

use reqwest::StatusCode;
use serde_json::{Value, json};

use deltaplane::schema::Registry;

use crate::both_backends;
use crate::harness::TestCp;

/// `kong/constants.lua` `plugins`, with each `handler.lua`'s `VERSION` and `PRIORITY`.
const HANDLERS: &[(&str, &str, i64)] = &[
    ("jwt", "3.10.0", 1450),
    ("acl", "3.10.0", 950),
    ("correlation-id", "3.10.0", 100001),
    ("cors", "3.10.0", 2000),
    ("oauth2", "3.10.0", 1400),
    ("tcp-log", "3.10.0", 7),
    ("udp-log", "3.10.0", 8),
    ("file-log", "3.10.0", 9),
    ("http-log", "3.10.0", 12),
    ("key-auth", "3.10.0", 1250),
    ("hmac-auth", "3.10.0", 1030),
    ("basic-auth", "3.10.0", 1100),
    ("ip-restriction", "3.10.0", 990),
    ("request-transformer", "3.10.0", 801),
    ("response-transformer", "3.10.0", 800),
    ("request-size-limiting", "3.10.0", 951),
    ("rate-limiting", "3.10.0", 910),
    ("response-ratelimiting", "3.10.0", 900),
    ("syslog", "3.10.0", 4),
    ("loggly", "3.10.0", 6),
    ("datadog", "3.10.0", 10),
    ("ldap-auth", "3.10.0", 1200),
    ("statsd", "3.10.0", 11),
    ("bot-detection", "3.10.0", 2500),
    ("aws-lambda", "3.10.0", 750),
    ("request-termination", "3.10.0", 2),
    ("prometheus", "3.10.0", 13),
    ("proxy-cache", "3.10.0", 100),
    ("session", "3.10.0", 1900),
    ("acme", "3.10.0", 1705),
    ("grpc-gateway", "3.10.0", 998),
    ("grpc-web", "3.10.0", 3),
    // pre-function/handler.lua: `_handler(1000000)`; post-function: `_handler(-1000)`.
    ("pre-function", "3.10.0", 1000000),
    ("post-function", "3.10.0", -1000),
    ("azure-functions", "3.10.0", 749),
    ("zipkin", "3.10.0", 100000),
    ("opentelemetry", "3.10.0", 14),
    // The ai-* handlers: `ai_plugin_base.define(NAME, PRIORITY)`, VERSION from kong.meta.
    ("ai-proxy", "3.10.0", 770),
    ("ai-prompt-decorator", "3.10.0", 772),
    ("ai-prompt-template", "3.10.0", 773),
    ("ai-prompt-guard", "3.10.0", 771),
    ("ai-request-transformer", "3.10.0", 777),
    ("ai-response-transformer", "3.10.0", 768),
    ("standard-webhooks", "3.10.0", 760),
    ("redirect", "3.10.0", 779),
];

/// A config and the whole config Kong fills from it.
struct Defaults {
    plugin: &'static str,
    /// Kong's schema file the expectation was read from.
    kong: &'static str,
    input: Value,
    filled: Value,
    /// Fields Kong generates at random: checked for a non-empty string, then compared as equal.
    generated: &'static [&'static str],
}

/// A config Kong refuses, and Kong's error tree for the plugin entity.
struct Invalid {
    plugin: &'static str,
    kong: &'static str,
    input: Value,
    fields: Value,
}

const HTTP: [&str; 4] = ["grpc", "grpcs", "http", "https"];

fn redis_defaults() -> Value {
    // kong/tools/redis/schema.lua config_schema
    json!({
        "host": null, "port": 6379, "timeout": 2000, "username": null, "password": null,
        "database": 0, "ssl": false, "ssl_verify": false, "server_name": null
    })
}

fn queue_defaults() -> Value {
    // kong/tools/queue_schema.lua
    json!({
        "max_batch_size": 1, "max_coalescing_delay": 1, "max_entries": 10000, "max_bytes": null,
        "max_retry_time": 60, "initial_retry_delay": 0.01, "max_retry_delay": 60,
        "concurrency_limit": 1
    })
}

fn llm_defaults(provider: &str) -> Value {
    // kong/llm/schemas/init.lua: `auth` and `model.options` are `required = false` records.
    json!({
        "route_type": "llm/v1/chat", "auth": null,
        "model": {"provider": provider, "name": null, "options": null},
        "logging": {"log_statistics": false, "log_payloads": false}
    })
}

fn defaults() -> Vec<Defaults> {
    vec![
        Defaults {
            plugin: "acme",
            kong: "kong/plugins/acme/schema.lua",
            // `shm` (the default storage) is refused on a control plane.
            input: json!({"account_email": "ops@example.com", "storage": "kong"}),
            filled: json!({
                "account_email": "ops@example.com", "account_key": null,
                "api_uri": "https://acme-v02.api.letsencrypt.org/directory",
                "tos_accepted": false, "eab_kid": null, "eab_hmac_key": null,
                "cert_type": "rsa", "rsa_key_size": 4096, "renew_threshold_days": 14,
                "domains": null, "allow_any_domain": false, "fail_backoff_minutes": 5,
                "storage": "kong",
                "storage_config": {
                    "shm": {"shm_name": "kong"},
                    "kong": {},
                    "redis": {
                        "host": null, "port": 6379, "timeout": 2000, "username": null,
                        "password": null, "database": 0, "ssl": false, "ssl_verify": false,
                        "server_name": null,
                        "extra_options": {"namespace": "", "scan_count": 10}
                    },
                    "consul": {
                        "https": false, "host": null, "port": null, "kv_path": null,
                        "timeout": null, "token": null
                    },
                    "vault": {
                        "https": false, "host": null, "port": null, "kv_path": null,
                        "timeout": null, "token": null, "tls_verify": true,
                        "tls_server_name": null, "auth_method": "token", "auth_path": null,
                        "auth_role": null, "jwt_path": null
                    }
                },
                "preferred_chain": null, "enable_ipv4_common_name": true
            }),
            generated: &[],
        },
        Defaults {
            plugin: "ai-prompt-decorator",
            kong: "kong/plugins/ai-prompt-decorator/schema.lua",
            input: json!({"prompts": {"prepend": [{"content": "Be brief."}]}}),
            filled: json!({
                "prompts": {"prepend": [{"role": "system", "content": "Be brief."}], "append": null},
                "max_request_body_size": 8192, "llm_format": "openai"
            }),
            generated: &[],
        },
        Defaults {
            plugin: "ai-prompt-guard",
            kong: "kong/plugins/ai-prompt-guard/schema.lua",
            input: json!({"deny_patterns": [".*password.*"]}),
            filled: json!({
                "allow_patterns": null, "deny_patterns": [".*password.*"],
                "allow_all_conversation_history": false, "max_request_body_size": 8192,
                "match_all_roles": false, "llm_format": "openai"
            }),
            generated: &[],
        },
        Defaults {
            plugin: "ai-prompt-template",
            kong: "kong/plugins/ai-prompt-template/schema.lua",
            input: json!({"templates": [{"name": "t", "template": "Hi {{name}}"}]}),
            filled: json!({
                "templates": [{"name": "t", "template": "Hi {{name}}"}],
                "allow_untemplated_requests": true, "log_original_request": false,
                "max_request_body_size": 8192
            }),
            generated: &[],
        },
        Defaults {
            plugin: "ai-proxy",
            kong: "kong/plugins/ai-proxy/schema.lua, kong/llm/schemas/init.lua",
            input: json!({"route_type": "llm/v1/chat", "model": {"provider": "openai"}}),
            filled: {
                let mut v = llm_defaults("openai");
                v["response_streaming"] = json!("allow");
                v["max_request_body_size"] = json!(8192);
                v["model_name_header"] = json!(true);
                v["llm_format"] = json!("openai");
                v
            },
            generated: &[],
        },
        Defaults {
            plugin: "ai-request-transformer",
            kong: "kong/plugins/ai-request-transformer/schema.lua, kong/llm/schemas/init.lua",
            input: json!({"prompt": "p", "llm": {"route_type": "llm/v1/chat",
                                                 "model": {"provider": "openai"}}}),
            filled: json!({
                "prompt": "p", "transformation_extract_pattern": null, "http_timeout": 60000,
                "https_verify": true, "max_request_body_size": 8192, "http_proxy_host": null,
                "http_proxy_port": null, "https_proxy_host": null, "https_proxy_port": null,
                "llm": llm_defaults("openai")
            }),
            generated: &[],
        },
        Defaults {
            plugin: "ai-response-transformer",
            kong: "kong/plugins/ai-response-transformer/schema.lua, kong/llm/schemas/init.lua",
            input: json!({"prompt": "p", "llm": {"route_type": "llm/v1/chat",
                                                 "model": {"provider": "cohere"}}}),
            filled: json!({
                "prompt": "p", "transformation_extract_pattern": null,
                "parse_llm_response_json_instructions": false, "http_timeout": 60000,
                "https_verify": true, "max_request_body_size": 8192, "http_proxy_host": null,
                "http_proxy_port": null, "https_proxy_host": null, "https_proxy_port": null,
                "llm": llm_defaults("cohere")
            }),
            generated: &[],
        },
        Defaults {
            plugin: "acl",
            kong: "kong/plugins/acl/schema.lua",
            input: json!({"allow": ["admins"]}),
            filled: json!({
                "allow": ["admins"], "deny": null, "hide_groups_header": false,
                "always_use_authenticated_groups": false
            }),
            generated: &[],
        },
        Defaults {
            plugin: "aws-lambda",
            kong: "kong/plugins/aws-lambda/schema.lua",
            input: json!({}),
            filled: json!({
                "timeout": 60000, "keepalive": 60000, "aws_key": null, "aws_secret": null,
                "aws_assume_role_arn": null, "aws_role_session_name": "kong",
                "aws_sts_endpoint_url": null, "aws_region": null, "function_name": null,
                "qualifier": null, "invocation_type": "RequestResponse", "log_type": "Tail",
                "host": null, "port": 443, "disable_https": false, "unhandled_status": null,
                "forward_request_method": false, "forward_request_uri": false,
                "forward_request_headers": false, "forward_request_body": false,
                "is_proxy_integration": false, "awsgateway_compatible": false,
                "proxy_url": null, "skip_large_bodies": true, "base64_encode_body": true,
                "aws_imds_protocol_version": "v1", "empty_arrays_mode": "legacy"
            }),
            generated: &[],
        },
        Defaults {
            plugin: "azure-functions",
            kong: "kong/plugins/azure-functions/schema.lua",
            input: json!({"appname": "app", "functionname": "fn"}),
            filled: json!({
                "timeout": 600000, "keepalive": 60000, "https": true, "https_verify": false,
                "apikey": null, "clientid": null, "appname": "app",
                "hostdomain": "azurewebsites.net", "routeprefix": "api", "functionname": "fn"
            }),
            generated: &[],
        },
        Defaults {
            plugin: "basic-auth",
            kong: "kong/plugins/basic-auth/schema.lua",
            input: json!({}),
            filled: json!({"anonymous": null, "hide_credentials": false, "realm": "service"}),
            generated: &[],
        },
        Defaults {
            plugin: "bot-detection",
            kong: "kong/plugins/bot-detection/schema.lua",
            input: json!({}),
            filled: json!({"allow": [], "deny": []}),
            generated: &[],
        },
        Defaults {
            plugin: "correlation-id",
            kong: "kong/plugins/correlation-id/schema.lua",
            input: json!({}),
            filled: json!({
                "header_name": "Kong-Request-ID", "generator": "uuid#counter",
                "echo_downstream": false
            }),
            generated: &[],
        },
        Defaults {
            plugin: "cors",
            kong: "kong/plugins/cors/schema.lua",
            input: json!({}),
            filled: json!({
                "origins": null, "headers": null, "exposed_headers": null,
                "methods": ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE",
                            "CONNECT"],
                "max_age": null, "credentials": false, "private_network": false,
                "preflight_continue": false, "allow_origin_absent": true
            }),
            generated: &[],
        },
        Defaults {
            plugin: "datadog",
            kong: "kong/plugins/datadog/schema.lua",
            input: json!({}),
            filled: {
                // DEFAULT_METRICS, every element filled with its record's fields.
                let metric = |name: &str, stat_type: &str, sample_rate: Value| {
                    json!({"name": name, "stat_type": stat_type, "tags": ["app:kong"],
                           "sample_rate": sample_rate, "consumer_identifier": "custom_id"})
                };
                json!({
                    "host": "localhost", "port": 8125, "prefix": "kong",
                    "service_name_tag": "name", "status_tag": "status",
                    "consumer_tag": "consumer", "retry_count": null, "queue_size": null,
                    "flush_timeout": null, "queue": queue_defaults(),
                    "metrics": [
                        metric("request_count", "counter", json!(1)),
                        metric("latency", "timer", Value::Null),
                        metric("request_size", "timer", Value::Null),
                        metric("response_size", "timer", Value::Null),
                        metric("upstream_latency", "timer", Value::Null),
                        metric("kong_latency", "timer", Value::Null)
                    ]
                })
            },
            generated: &[],
        },
        Defaults {
            plugin: "file-log",
            kong: "kong/plugins/file-log/schema.lua",
            input: json!({"path": "/var/log/kong.log"}),
            filled: json!({
                "path": "/var/log/kong.log", "reopen": false, "custom_fields_by_lua": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "grpc-gateway",
            kong: "kong/plugins/grpc-gateway/schema.lua",
            input: json!({}),
            filled: json!({"proto": null}),
            generated: &[],
        },
        Defaults {
            plugin: "grpc-web",
            kong: "kong/plugins/grpc-web/schema.lua",
            input: json!({}),
            filled: json!({
                "proto": null, "pass_stripped_path": null, "allow_origin_header": "*"
            }),
            generated: &[],
        },
        Defaults {
            plugin: "hmac-auth",
            kong: "kong/plugins/hmac-auth/schema.lua",
            input: json!({}),
            filled: json!({
                "hide_credentials": false, "clock_skew": 300, "anonymous": null,
                "validate_request_body": false, "enforce_headers": [],
                "algorithms": ["hmac-sha1", "hmac-sha256", "hmac-sha384", "hmac-sha512"],
                "realm": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "http-log",
            kong: "kong/plugins/http-log/schema.lua",
            input: json!({"http_endpoint": "http://log.test/kong"}),
            filled: json!({
                "http_endpoint": "http://log.test/kong", "method": "POST",
                "content_type": "application/json", "timeout": 10000, "keepalive": 60000,
                "retry_count": null, "queue_size": null, "flush_timeout": null,
                "headers": null, "queue": queue_defaults(), "custom_fields_by_lua": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "ip-restriction",
            kong: "kong/plugins/ip-restriction/schema.lua",
            input: json!({"allow": ["10.0.0.0/8", "::1"]}),
            filled: json!({
                "allow": ["10.0.0.0/8", "::1"], "deny": null, "status": null, "message": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "jwt",
            kong: "kong/plugins/jwt/schema.lua",
            input: json!({}),
            filled: json!({
                "uri_param_names": ["jwt"], "cookie_names": [], "key_claim_name": "iss",
                "secret_is_base64": false, "claims_to_verify": null, "anonymous": null,
                "run_on_preflight": true, "maximum_expiration": 0,
                "header_names": ["authorization"], "realm": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "key-auth",
            kong: "kong/plugins/key-auth/schema.lua",
            input: json!({}),
            filled: json!({
                "key_names": ["apikey"], "hide_credentials": false, "anonymous": null,
                "key_in_header": true, "key_in_query": true, "key_in_body": false,
                "run_on_preflight": true, "realm": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "ldap-auth",
            kong: "kong/plugins/ldap-auth/schema.lua",
            input: json!({"ldap_host": "ldap.test", "base_dn": "dc=example,dc=com",
                          "attribute": "cn"}),
            filled: json!({
                "ldap_host": "ldap.test", "ldap_port": 389, "ldaps": false, "start_tls": false,
                "verify_ldap_host": false, "base_dn": "dc=example,dc=com", "attribute": "cn",
                "cache_ttl": 60, "hide_credentials": false, "timeout": 10000,
                "keepalive": 60000, "anonymous": null, "header_type": "ldap", "realm": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "loggly",
            kong: "kong/plugins/loggly/schema.lua",
            input: json!({"key": "token"}),
            filled: json!({
                "host": "logs-01.loggly.com", "port": 514, "key": "token", "tags": ["kong"],
                "log_level": "info", "successful_severity": "info",
                "client_errors_severity": "info", "server_errors_severity": "info",
                "timeout": 10000, "custom_fields_by_lua": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "oauth2",
            kong: "kong/plugins/oauth2/schema.lua",
            input: json!({"enable_client_credentials": true}),
            filled: json!({
                "scopes": null, "mandatory_scope": false, "provision_key": "(generated)",
                "token_expiration": 7200, "enable_authorization_code": false,
                "enable_implicit_grant": false, "enable_client_credentials": true,
                "enable_password_grant": false, "hide_credentials": false,
                "accept_http_if_already_terminated": false, "anonymous": null,
                "global_credentials": false, "auth_header_name": "authorization",
                "refresh_token_ttl": 1209600, "reuse_refresh_token": false, "pkce": "lax",
                "realm": null
            }),
            generated: &["provision_key"],
        },
        Defaults {
            plugin: "opentelemetry",
            kong: "kong/plugins/opentelemetry/schema.lua",
            input: json!({"traces_endpoint": "http://otel.test:4318/v1/traces"}),
            filled: {
                let mut queue = queue_defaults();
                queue["max_batch_size"] = json!(200);
                json!({
                    "traces_endpoint": "http://otel.test:4318/v1/traces", "logs_endpoint": null,
                    "headers": null, "resource_attributes": null, "queue": queue,
                    "batch_span_count": null, "batch_flush_delay": null,
                    "connect_timeout": 1000, "send_timeout": 5000, "read_timeout": 5000,
                    "http_response_header_for_traceid": null, "header_type": "preserve",
                    "sampling_rate": null,
                    "propagation": {"extract": null, "clear": null, "inject": null,
                                    "default_format": "w3c"}
                })
            },
            generated: &[],
        },
        Defaults {
            plugin: "post-function",
            kong: "kong/plugins/pre-function/_schema.lua",
            input: json!({"log": ["kong.log.err('done')"]}),
            filled: json!({
                "certificate": [], "rewrite": [], "access": [], "header_filter": [],
                "body_filter": [], "log": ["kong.log.err('done')"]
            }),
            generated: &[],
        },
        Defaults {
            plugin: "pre-function",
            kong: "kong/plugins/pre-function/_schema.lua",
            input: json!({"access": ["kong.log.err('hi')"]}),
            filled: json!({
                "certificate": [], "rewrite": [], "access": ["kong.log.err('hi')"],
                "header_filter": [], "body_filter": [], "log": []
            }),
            generated: &[],
        },
        Defaults {
            plugin: "prometheus",
            kong: "kong/plugins/prometheus/schema.lua",
            input: json!({}),
            filled: json!({
                "per_consumer": false, "status_code_metrics": false, "ai_metrics": false,
                "latency_metrics": false, "bandwidth_metrics": false,
                "upstream_health_metrics": false, "wasm_metrics": false
            }),
            generated: &[],
        },
        Defaults {
            plugin: "proxy-cache",
            kong: "kong/plugins/proxy-cache/schema.lua",
            input: json!({"strategy": "memory"}),
            filled: json!({
                "response_code": [200, 301, 404], "request_method": ["GET", "HEAD"],
                "content_type": ["text/plain", "application/json"], "cache_ttl": 300,
                "strategy": "memory", "cache_control": false, "ignore_uri_case": false,
                "storage_ttl": null, "memory": {"dictionary_name": "kong_db_cache"},
                "vary_query_params": null, "vary_headers": null,
                "response_headers": {"age": true, "X-Cache-Status": true, "X-Cache-Key": true}
            }),
            generated: &[],
        },
        Defaults {
            plugin: "rate-limiting",
            kong: "kong/plugins/rate-limiting/schema.lua",
            input: json!({"minute": 5}),
            filled: json!({
                "second": null, "minute": 5, "hour": null, "day": null, "month": null,
                "year": null, "limit_by": "consumer", "header_name": null, "path": null,
                "policy": "local", "fault_tolerant": true, "redis": redis_defaults(),
                "hide_client_headers": false, "error_code": 429,
                "error_message": "API rate limit exceeded", "sync_rate": -1
            }),
            generated: &[],
        },
        Defaults {
            plugin: "redirect",
            kong: "kong/plugins/redirect/schema.lua",
            input: json!({"location": "https://example.com/new"}),
            filled: json!({
                "status_code": 301, "location": "https://example.com/new",
                "keep_incoming_path": false
            }),
            generated: &[],
        },
        Defaults {
            plugin: "request-size-limiting",
            kong: "kong/plugins/request-size-limiting/schema.lua",
            input: json!({}),
            filled: json!({
                "allowed_payload_size": 128, "size_unit": "megabytes",
                "require_content_length": false
            }),
            generated: &[],
        },
        Defaults {
            plugin: "request-termination",
            kong: "kong/plugins/request-termination/schema.lua",
            input: json!({}),
            filled: json!({
                "status_code": 503, "message": null, "content_type": null, "body": null,
                "echo": false, "trigger": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "request-transformer",
            kong: "kong/plugins/request-transformer/schema.lua",
            input: json!({"add": {"headers": ["x-a:1"]}}),
            filled: {
                let three = json!({"body": [], "headers": [], "querystring": []});
                json!({
                    "http_method": null, "remove": three, "rename": three,
                    "replace": {"body": [], "headers": [], "querystring": [], "uri": null},
                    "add": {"body": [], "headers": ["x-a:1"], "querystring": []},
                    "append": three
                })
            },
            generated: &[],
        },
        Defaults {
            plugin: "response-ratelimiting",
            kong: "kong/plugins/response-ratelimiting/schema.lua",
            input: json!({"limits": {"video": {"minute": 10}}}),
            filled: json!({
                "header_name": "x-kong-limit", "limit_by": "consumer", "policy": "local",
                "fault_tolerant": true, "redis": redis_defaults(),
                "block_on_first_violation": false, "hide_client_headers": false,
                "limits": {"video": {"second": null, "minute": 10, "hour": null, "day": null,
                                     "month": null, "year": null}}
            }),
            generated: &[],
        },
        Defaults {
            plugin: "response-transformer",
            kong: "kong/plugins/response-transformer/schema.lua",
            input: json!({}),
            filled: {
                let colon = json!({"json": [], "json_types": [], "headers": []});
                json!({
                    "remove": {"json": [], "headers": []},
                    "rename": {"json": [], "headers": []},
                    "replace": colon, "add": colon, "append": colon
                })
            },
            generated: &[],
        },
        Defaults {
            plugin: "session",
            kong: "kong/plugins/session/schema.lua",
            input: json!({}),
            filled: json!({
                "secret": "(generated)", "storage": "cookie", "audience": "default",
                "idling_timeout": 900, "rolling_timeout": 3600, "absolute_timeout": 86400,
                "stale_ttl": 10, "cookie_name": "session", "cookie_path": "/",
                "cookie_domain": null, "cookie_same_site": "Strict", "cookie_http_only": true,
                "cookie_secure": true, "remember": false, "remember_cookie_name": "remember",
                "remember_rolling_timeout": 604800, "remember_absolute_timeout": 2592000,
                "response_headers": null, "request_headers": null,
                "read_body_for_logout": false, "logout_methods": ["POST", "DELETE"],
                "logout_query_arg": "session_logout", "logout_post_arg": "session_logout",
                "hash_subject": false, "store_metadata": false
            }),
            generated: &["secret"],
        },
        Defaults {
            plugin: "standard-webhooks",
            kong: "kong/plugins/standard-webhooks/schema.lua",
            input: json!({"secret_v1": "whsec"}),
            filled: json!({"secret_v1": "whsec", "tolerance_second": 300}),
            generated: &[],
        },
        Defaults {
            plugin: "statsd",
            kong: "kong/plugins/statsd/schema.lua",
            input: json!({}),
            filled: {
                // DEFAULT_METRICS, every element filled with its record's fields.
                let metric = |name: &str, stat_type: &str, sample_rate: Value| {
                    json!({"name": name, "stat_type": stat_type, "sample_rate": sample_rate,
                           "consumer_identifier": null, "service_identifier": null,
                           "workspace_identifier": null})
                };
                let one = || json!(1);
                json!({
                    "host": "localhost", "port": 8125, "prefix": "kong",
                    "metrics": [
                        metric("request_count", "counter", one()),
                        metric("latency", "timer", Value::Null),
                        metric("request_size", "counter", one()),
                        metric("status_count", "counter", one()),
                        metric("response_size", "counter", one()),
                        metric("unique_users", "set", Value::Null),
                        metric("request_per_user", "counter", one()),
                        metric("upstream_latency", "timer", Value::Null),
                        metric("kong_latency", "timer", Value::Null),
                        metric("status_count_per_user", "counter", one()),
                        metric("status_count_per_workspace", "counter", one()),
                        metric("status_count_per_user_per_route", "counter", one()),
                        metric("shdict_usage", "gauge", one())
                    ],
                    "allow_status_codes": null, "udp_packet_size": 0, "use_tcp": false,
                    "hostname_in_prefix": false, "consumer_identifier_default": "custom_id",
                    "service_identifier_default": "service_name_or_host",
                    "workspace_identifier_default": "workspace_id", "retry_count": null,
                    "queue_size": null, "flush_timeout": null, "tag_style": null,
                    "queue": queue_defaults()
                })
            },
            generated: &[],
        },
        Defaults {
            plugin: "syslog",
            kong: "kong/plugins/syslog/schema.lua",
            input: json!({}),
            filled: json!({
                "log_level": "info", "successful_severity": "info",
                "client_errors_severity": "info", "server_errors_severity": "info",
                "custom_fields_by_lua": null, "facility": "user"
            }),
            generated: &[],
        },
        Defaults {
            plugin: "tcp-log",
            kong: "kong/plugins/tcp-log/schema.lua",
            input: json!({"host": "logs.test", "port": 5000}),
            filled: json!({
                "host": "logs.test", "port": 5000, "timeout": 10000, "keepalive": 60000,
                "tls": false, "tls_sni": null, "custom_fields_by_lua": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "udp-log",
            kong: "kong/plugins/udp-log/schema.lua",
            input: json!({"host": "logs.test", "port": 5000}),
            filled: json!({
                "host": "logs.test", "port": 5000, "timeout": 10000,
                "custom_fields_by_lua": null
            }),
            generated: &[],
        },
        Defaults {
            plugin: "zipkin",
            kong: "kong/plugins/zipkin/schema.lua",
            input: json!({}),
            filled: json!({
                "local_service_name": "kong", "http_endpoint": null, "sample_ratio": 0.001,
                "default_service_name": null, "include_credential": true,
                "traceid_byte_count": 16, "header_type": "preserve",
                "default_header_type": "b3", "tags_header": "Zipkin-Tags",
                "static_tags": null, "http_span_name": "method", "connect_timeout": 2000,
                "send_timeout": 5000, "read_timeout": 5000,
                "http_response_header_for_traceid": null,
                "phase_duration_flavor": "annotations", "queue": queue_defaults(),
                "propagation": {"extract": null, "clear": null, "inject": null,
                                "default_format": "b3"}
            }),
            generated: &[],
        },
    ]
}

fn invalid() -> Vec<Invalid> {
    vec![
        Invalid {
            plugin: "acme",
            kong: "kong/plugins/acme/schema.lua",
            input: json!({}),
            fields: json!({
                "config": {"account_email": "required field missing"},
                "@entity": ["\"shm\" storage can't be used in Hybrid mode"]
            }),
        },
        Invalid {
            plugin: "acme",
            kong: "kong/plugins/acme/schema.lua",
            input: json!({"account_email": "nobody", "storage": "kong",
                          "api_uri": "https://acme-v02.api.letsencrypt.org",
                          "domains": ["*.example.com", "bad domain", "a.*.com"]}),
            fields: json!({
                "config": {
                    "account_email": "invalid value: nobody",
                    "tos_accepted": "value must be true",
                    "domains": [null, "invalid hostname: bad domain",
                                "invalid wildcard: must be placed at leftmost or rightmost label"]
                },
                "@entity": ["terms of service must be accepted, see https://letsencrypt.org/repository/"]
            }),
        },
        Invalid {
            plugin: "acme",
            kong: "kong/plugins/acme/schema.lua",
            input: json!({"account_email": "a@b.test", "storage": "redis",
                          "storage_config": {"redis": {"extra_options": {
                              "namespace": "kong_acme:cert_key:x"}}}}),
            fields: json!({
                "config": {"storage_config": {"redis": {
                    "host": "required field missing",
                    "extra_options": {"namespace": "namespace can't be prefixed with reserved word: kong_acme:cert_key:"}
                }}},
                "@entity": ["failed conditional validation given value of field 'config.storage'"]
            }),
        },
        Invalid {
            plugin: "ai-prompt-decorator",
            kong: "kong/plugins/ai-prompt-decorator/schema.lua",
            input: json!({}),
            fields: json!({"@entity": [
                "at least one of these fields must be non-empty: 'config.prompts.prepend', 'config.prompts.append'"
            ]}),
        },
        Invalid {
            plugin: "ai-prompt-decorator",
            kong: "kong/plugins/ai-prompt-decorator/schema.lua",
            input: json!({"prompts": {"append": [{"role": "robot", "content": ""}]}}),
            fields: json!({"config": {"prompts": {"append": [{
                "role": "expected one of: system, assistant, user",
                "content": "length must be at least 1"
            }]}}}),
        },
        Invalid {
            plugin: "ai-prompt-guard",
            kong: "kong/plugins/ai-prompt-guard/schema.lua",
            input: json!({"deny_patterns": ["x"], "match_all_roles": true,
                          "allow_all_conversation_history": true}),
            fields: json!({
                "config": {"allow_all_conversation_history": "value must be false"},
                "@entity": ["failed conditional validation given value of field 'config.match_all_roles'"]
            }),
        },
        Invalid {
            plugin: "ai-prompt-template",
            kong: "kong/plugins/ai-prompt-template/schema.lua",
            input: json!({"templates": [{"name": "t"}], "max_request_body_size": 0}),
            fields: json!({"config": {
                "templates": [{"template": "required field missing"}],
                "max_request_body_size": "value must be greater than 0"
            }}),
        },
        Invalid {
            plugin: "ai-proxy",
            kong: "kong/llm/schemas/init.lua",
            input: json!({"route_type": "llm/v1/chat", "model": {"provider": "azure"}}),
            fields: json!({"config": {"@entity": [
                "must set 'model.options.azure_instance' for azure provider",
                "must set 'model.options.azure_api_version' for azure provider",
                "must set 'model.options.azure_deployment_id' for azure provider"
            ]}}),
        },
        Invalid {
            plugin: "ai-proxy",
            kong: "kong/llm/schemas/init.lua",
            input: json!({"route_type": "llm/v1/completions",
                          "model": {"provider": "anthropic", "options": {"anthropic_version": "1"}},
                          "logging": {"log_statistics": true}}),
            fields: json!({"config": {"@entity": [
                "anthropic does not support statistics when route_type is llm/v1/completions"
            ]}}),
        },
        Invalid {
            // Kong's conditional compares a missing `auth` as null, and null is not false.
            plugin: "ai-proxy",
            kong: "kong/llm/schemas/init.lua",
            input: json!({"route_type": "llm/v1/chat", "model": {"provider": "bedrock"}}),
            fields: json!({"config": {
                "auth": {"allow_override": "value must be false"},
                "@entity": ["bedrock and gemini only support auth.allow_override = false"]
            }}),
        },
        Invalid {
            plugin: "ai-proxy",
            kong: "kong/plugins/ai-proxy/schema.lua",
            input: json!({"route_type": "llm/v1/completions", "model": {"provider": "openai"},
                          "llm_format": "bedrock", "auth": {"header_name": "x-key"}}),
            fields: json!({
                "config": {
                    "route_type": "value must be llm/v1/chat",
                    "model": {"provider": "value must be bedrock"},
                    "@entity": ["all or none of these fields must be set: 'auth.header_name', 'auth.header_value'"]
                },
                "@entity": [
                    "native provider options in llm_format can only be used with the 'llm/v1/chat' route_type",
                    "native llm_format 'bedrock' can only be used with the 'bedrock' model.provider"
                ]
            }),
        },
        Invalid {
            plugin: "ai-request-transformer",
            kong: "kong/plugins/ai-request-transformer/schema.lua",
            input: json!({}),
            fields: json!({"config": {
                "prompt": "required field missing",
                "llm": {"route_type": "required field missing",
                        "model": {"provider": "required field missing"}}
            }}),
        },
        Invalid {
            plugin: "ai-request-transformer",
            kong: "kong/plugins/ai-request-transformer/schema.lua",
            input: json!({"prompt": "p", "http_proxy_host": "proxy.test",
                          "llm": {"route_type": "preserve", "model": {"provider": "openai"}}}),
            fields: json!({
                "config": {"llm": {"route_type": "value must be llm/v1/chat"}},
                "@entity": [
                    "'config.llm.route_type' must be 'llm/v1/chat' for AI transformer plugins",
                    "all or none of these fields must be set: 'config.http_proxy_host', 'config.http_proxy_port'"
                ]
            }),
        },
        Invalid {
            plugin: "ai-response-transformer",
            kong: "kong/plugins/ai-response-transformer/schema.lua",
            input: json!({"prompt": "p", "https_proxy_port": 70000,
                          "llm": {"route_type": "llm/v1/chat",
                                  "model": {"provider": "llama2", "options": {"temperature": 9}}}}),
            fields: json!({
                "config": {
                    "https_proxy_port": "value should be between 0 and 65535",
                    "llm": {
                        "model": {"options": {"temperature": "value should be between 0 and 5"}},
                        "@entity": [
                            "must set 'model.options.llama2_format' for llama2 provider",
                            "must set 'model.options.upstream_url' for self-hosted providers/models"
                        ]
                    }
                },
                "@entity": ["all or none of these fields must be set: 'config.https_proxy_host', 'config.https_proxy_port'"]
            }),
        },
        Invalid {
            plugin: "acl",
            kong: "kong/plugins/acl/schema.lua",
            input: json!({}),
            fields: json!({"@entity": [
                "exactly one of these fields must be non-empty: 'config.allow', 'config.deny'",
                "at least one of these fields must be non-empty: 'config.allow', 'config.deny'"
            ]}),
        },
        Invalid {
            plugin: "acl",
            kong: "kong/plugins/acl/schema.lua",
            input: json!({"allow": ["a"], "deny": ["b"]}),
            fields: json!({"@entity": [
                "exactly one of these fields must be non-empty: 'config.allow', 'config.deny'"
            ]}),
        },
        Invalid {
            plugin: "aws-lambda",
            kong: "kong/plugins/aws-lambda/schema.lua",
            input: json!({"aws_key": "k", "proxy_url": "https://proxy.test"}),
            fields: json!({"@entity": [
                "all or none of these fields must be set: 'config.aws_key', 'config.aws_secret'",
                "proxy_url scheme must be http"
            ]}),
        },
        Invalid {
            // A Vault reference in a referenceable field turns its checks off (no
            // mutually_required error), as Kong's run_entity_check does.
            plugin: "aws-lambda",
            kong: "kong/plugins/aws-lambda/schema.lua",
            input: json!({"aws_region": "us east", "unhandled_status": 42,
                          "invocation_type": "Async", "port": 443.5,
                          "aws_secret": "{vault://env/secret}"}),
            fields: json!({
                "config": {
                    "aws_region": "invalid value: us east",
                    "unhandled_status": "value should be between 100 and 999",
                    "invocation_type": "expected one of: RequestResponse, Event, DryRun",
                    "port": "expected an integer"
                }
            }),
        },
        Invalid {
            plugin: "azure-functions",
            kong: "kong/plugins/azure-functions/schema.lua",
            input: json!({"hostdomain": null}),
            fields: json!({"config": {
                "appname": "required field missing",
                "functionname": "required field missing",
                "hostdomain": "required field missing"
            }}),
        },
        Invalid {
            plugin: "basic-auth",
            kong: "kong/plugins/basic-auth/schema.lua",
            input: json!({"hide_credentials": "yes", "realm": ""}),
            fields: json!({"config": {
                "hide_credentials": "expected a boolean",
                "realm": "length must be at least 1"
            }}),
        },
        Invalid {
            plugin: "bot-detection",
            kong: "kong/plugins/bot-detection/schema.lua",
            input: json!({"allow": ["curl/.*", "(x"]}),
            fields: json!({"config": {"allow": [null, "not a valid regex: (x"]}}),
        },
        Invalid {
            plugin: "correlation-id",
            kong: "kong/plugins/correlation-id/schema.lua",
            input: json!({"generator": "random", "header_name": ""}),
            fields: json!({"config": {
                "generator": "expected one of: uuid, uuid#counter, tracker",
                "header_name": "length must be at least 1"
            }}),
        },
        Invalid {
            plugin: "cors",
            kong: "kong/plugins/cors/schema.lua",
            input: json!({"origins": ["*", "(bad"], "methods": ["GET", "FETCH"]}),
            fields: json!({"config": {
                "origins": [null, "'(bad' is not a valid regex"],
                "methods": [null, "expected one of: GET, HEAD, PUT, PATCH, POST, DELETE, OPTIONS, TRACE, CONNECT"]
            }}),
        },
        Invalid {
            plugin: "datadog",
            kong: "kong/plugins/datadog/schema.lua",
            input: json!({"metrics": [
                {"name": "latency", "stat_type": "timer"},
                {"name": "request_count", "stat_type": "gauge", "tags": ["app:"]}
            ], "queue": {"concurrency_limit": 2}}),
            fields: json!({"config": {
                "metrics": [null, {
                    "tags": ["invalid value: app:"],
                    "sample_rate": "required field missing",
                    "@entity": ["failed conditional validation given value of field 'stat_type'"]
                }],
                "queue": {"concurrency_limit": "expected one of: -1, 1"}
            }}),
        },
        Invalid {
            plugin: "file-log",
            kong: "kong/plugins/file-log/schema.lua",
            input: json!({"path": "/tmp/*.log", "custom_fields_by_lua": {"f": ""}}),
            fields: json!({"config": {
                "path": "not a valid filename",
                "custom_fields_by_lua": "length must be at least 1"
            }}),
        },
        Invalid {
            plugin: "grpc-gateway",
            kong: "kong/plugins/grpc-gateway/schema.lua",
            input: json!({"proto": 5, "extra": true}),
            fields: json!({"config": {"proto": "expected a string", "extra": "unknown field"}}),
        },
        Invalid {
            plugin: "grpc-web",
            kong: "kong/plugins/grpc-web/schema.lua",
            input: json!({"allow_origin_header": "", "pass_stripped_path": "yes"}),
            fields: json!({"config": {
                "allow_origin_header": "length must be at least 1",
                "pass_stripped_path": "expected a boolean"
            }}),
        },
        Invalid {
            plugin: "hmac-auth",
            kong: "kong/plugins/hmac-auth/schema.lua",
            input: json!({"clock_skew": 0, "algorithms": ["hmac-md5"]}),
            fields: json!({"config": {
                "clock_skew": "value must be greater than 0",
                "algorithms": ["expected one of: hmac-sha1, hmac-sha256, hmac-sha384, hmac-sha512"]
            }}),
        },
        Invalid {
            plugin: "http-log",
            kong: "kong/plugins/http-log/schema.lua",
            input: json!({"http_endpoint": "http://user:pw@log.test/",
                          "headers": {"Authorization": "Basic x"}}),
            fields: json!({"config": "specifying both an 'Authorization' header and user info in 'http_endpoint' is not allowed"}),
        },
        Invalid {
            plugin: "http-log",
            kong: "kong/plugins/http-log/schema.lua",
            input: json!({"http_endpoint": "log.test", "headers": {"Host": "x"},
                          "method": "GET"}),
            fields: json!({"config": {
                "http_endpoint": "missing host in url",
                "headers": "cannot contain 'Host' header",
                "method": "expected one of: POST, PUT, PATCH"
            }}),
        },
        Invalid {
            plugin: "ip-restriction",
            kong: "kong/plugins/ip-restriction/schema.lua",
            input: json!({}),
            fields: json!({"@entity": [
                "at least one of these fields must be non-empty: 'config.allow', 'config.deny'"
            ]}),
        },
        Invalid {
            plugin: "ip-restriction",
            kong: "kong/plugins/ip-restriction/schema.lua",
            input: json!({"deny": ["10.0.0.300"], "status": "403"}),
            fields: json!({"config": {
                "deny": ["invalid ip or cidr range: '10.0.0.300'"],
                "status": "expected a number"
            }}),
        },
        Invalid {
            plugin: "jwt",
            kong: "kong/plugins/jwt/schema.lua",
            input: json!({"maximum_expiration": 60, "claims_to_verify": ["nbf"]}),
            fields: json!({
                "config": {"claims_to_verify": "expected to contain: exp"},
                "@entity": ["failed conditional validation given value of field 'config.maximum_expiration'"]
            }),
        },
        Invalid {
            plugin: "jwt",
            kong: "kong/plugins/jwt/schema.lua",
            input: json!({"maximum_expiration": -1, "claims_to_verify": ["iat"]}),
            fields: json!({"config": {
                "maximum_expiration": "value should be between 0 and 31536000",
                "claims_to_verify": ["expected one of: exp, nbf"]
            }}),
        },
        Invalid {
            plugin: "key-auth",
            kong: "kong/plugins/key-auth/schema.lua",
            input: json!({"key_names": ["api key"]}),
            fields: json!({"config": {"key_names": [
                "bad header name 'api key', allowed characters are A-Z, a-z, 0-9, '_', and '-'"
            ]}}),
        },
        Invalid {
            plugin: "ldap-auth",
            kong: "kong/plugins/ldap-auth/schema.lua",
            input: json!({"ldap_host": "ldap.test:389", "base_dn": "dc=x", "attribute": "cn",
                          "ldaps": true, "start_tls": true}),
            fields: json!({"config": {
                "ldap_host": "must not have a port",
                "start_tls": "value must be false",
                "@entity": ["'ldaps' and 'start_tls' cannot be enabled simultaneously"]
            }}),
        },
        Invalid {
            plugin: "loggly",
            kong: "kong/plugins/loggly/schema.lua",
            input: json!({"log_level": "fatal", "tags": "kong"}),
            fields: json!({"config": {
                "key": "required field missing",
                "log_level": "expected one of: debug, info, notice, warning, err, crit, alert, emerg",
                "tags": "expected a set"
            }}),
        },
        Invalid {
            plugin: "oauth2",
            kong: "kong/plugins/oauth2/schema.lua",
            input: json!({}),
            fields: json!({"config": "at least one of these fields must be true: enable_authorization_code, enable_implicit_grant, enable_client_credentials, enable_password_grant"}),
        },
        Invalid {
            plugin: "oauth2",
            kong: "kong/plugins/oauth2/schema.lua",
            input: json!({"enable_password_grant": true, "mandatory_scope": true,
                          "pkce": "always", "refresh_token_ttl": -1}),
            fields: json!({"config": {
                "pkce": "expected one of: none, lax, strict",
                "refresh_token_ttl": "value should be between 0 and 100000000",
                "scopes": "required field missing",
                "@entity": ["failed conditional validation given value of field 'mandatory_scope'"]
            }}),
        },
        Invalid {
            plugin: "opentelemetry",
            kong: "kong/plugins/opentelemetry/schema.lua",
            input: json!({}),
            fields: json!({"config": {"@entity": [
                "at least one of these fields must be non-empty: 'traces_endpoint', 'logs_endpoint'"
            ]}}),
        },
        Invalid {
            // The deprecated `endpoint` moves into `traces_endpoint`.
            plugin: "opentelemetry",
            kong: "kong/plugins/opentelemetry/schema.lua",
            input: json!({"endpoint": "http://otel.test/v1/traces", "sampling_rate": 2,
                          "propagation": {"clear": ["bad header"]},
                          "resource_attributes": {"service.name": ""}}),
            fields: json!({"config": {
                "sampling_rate": "value should be between 0 and 1",
                "propagation": {
                    "clear": ["bad header name 'bad header', allowed characters are A-Z, a-z, 0-9, '_', and '-'"],
                    "default_format": "required field missing"
                },
                "resource_attributes": "length must be at least 1"
            }}),
        },
        Invalid {
            // A bad shorthand value stops Kong's processing: its error comes alone, at the top.
            plugin: "opentelemetry",
            kong: "kong/plugins/opentelemetry/schema.lua (shorthand_fields)",
            input: json!({"endpoint": "otel.test"}),
            fields: json!({"endpoint": "missing host in url"}),
        },
        Invalid {
            plugin: "post-function",
            kong: "kong/plugins/pre-function/_schema.lua",
            input: json!({"access": [42], "log": null}),
            fields: json!({"config": {
                "access": ["expected a string"],
                "log": "required field missing"
            }}),
        },
        Invalid {
            plugin: "pre-function",
            kong: "kong/plugins/pre-function/_schema.lua",
            input: json!({}),
            fields: json!({"@entity": [
                "at least one of these fields must be non-empty: 'config.certificate', 'config.rewrite', 'config.access', 'config.header_filter', 'config.body_filter', 'config.log'"
            ]}),
        },
        Invalid {
            plugin: "prometheus",
            kong: "kong/plugins/prometheus/schema.lua",
            input: json!({"per_consumer": "yes", "latency_metrics": null}),
            fields: json!({"config": {"per_consumer": "expected a boolean"}}),
        },
        Invalid {
            plugin: "proxy-cache",
            kong: "kong/plugins/proxy-cache/schema.lua",
            input: json!({"response_code": [], "strategy": "disk", "cache_ttl": 0,
                          "request_method": ["DELETE"], "memory": null}),
            fields: json!({"config": {
                "response_code": "length must be at least 1",
                "strategy": "expected one of: memory",
                "cache_ttl": "value must be greater than 0",
                "request_method": ["expected one of: HEAD, GET, POST, PATCH, PUT"],
                "memory": "required field missing"
            }}),
        },
        Invalid {
            plugin: "proxy-cache",
            kong: "kong/plugins/proxy-cache/schema.lua",
            input: json!({"strategy": "memory", "response_code": [99, 200]}),
            fields: json!({"config": {"response_code": [
                "value should be between 100 and 900", null
            ]}}),
        },
        Invalid {
            plugin: "rate-limiting",
            kong: "kong/plugins/rate-limiting/schema.lua",
            input: json!({"minute": 5, "hour": 1}),
            fields: json!({
                "config": "The limit for hour(1.0) cannot be lower than the limit for minute(5.0)"
            }),
        },
        Invalid {
            plugin: "rate-limiting",
            kong: "kong/plugins/rate-limiting/schema.lua",
            input: json!({"minute": 5, "policy": "redis"}),
            fields: json!({
                "config": {"redis": {"host": "required field missing"}},
                "@entity": ["failed conditional validation given value of field 'config.policy'"]
            }),
        },
        Invalid {
            plugin: "rate-limiting",
            kong: "kong/plugins/rate-limiting/schema.lua",
            input: json!({"second": 0, "policy": "cluster"}),
            fields: json!({"config": {
                "second": "value must be greater than 0",
                "policy": "expected one of: local, redis"
            }}),
        },
        Invalid {
            plugin: "redirect",
            kong: "kong/plugins/redirect/schema.lua",
            input: json!({"status_code": 600}),
            fields: json!({"config": {
                "status_code": "value should be between 100 and 599",
                "location": "required field missing"
            }}),
        },
        Invalid {
            plugin: "rate-limiting",
            kong: "kong/plugins/rate-limiting/schema.lua (shorthand_fields)",
            input: json!({"minute": 5, "redis_port": "x"}),
            fields: json!({"redis_port": "expected an integer"}),
        },
        Invalid {
            plugin: "request-size-limiting",
            kong: "kong/plugins/request-size-limiting/schema.lua",
            input: json!({"size_unit": "gigabytes", "allowed_payload_size": 1.5}),
            fields: json!({"config": {
                "size_unit": "expected one of: megabytes, kilobytes, bytes",
                "allowed_payload_size": "expected an integer"
            }}),
        },
        Invalid {
            plugin: "request-termination",
            kong: "kong/plugins/request-termination/schema.lua",
            input: json!({"message": "m", "body": "b"}),
            fields: json!({"config": "message cannot be used with content_type or body"}),
        },
        Invalid {
            plugin: "request-termination",
            kong: "kong/plugins/request-termination/schema.lua",
            input: json!({"content_type": "text/plain", "status_code": 99}),
            fields: json!({"config": {"status_code": "value should be between 100 and 599"}}),
        },
        Invalid {
            plugin: "request-termination",
            kong: "kong/plugins/request-termination/schema.lua",
            input: json!({"content_type": "text/plain"}),
            fields: json!({"config": "content_type requires a body"}),
        },
        Invalid {
            plugin: "request-transformer",
            kong: "kong/plugins/request-transformer/schema.lua",
            input: json!({"http_method": "get",
                          "add": {"headers": ["x-a", "bad name:v"], "body": ["k:"]},
                          "rename": {"headers": ["a:"]}}),
            fields: json!({"config": {
                "http_method": "invalid value: get",
                "add": {
                    "headers": ["invalid value: x-a", "'bad name' is not a valid header"],
                    "body": ["key 'k' has no value"]
                },
                "rename": {"headers": ["'' is not a valid header"]}
            }}),
        },
        Invalid {
            plugin: "response-ratelimiting",
            kong: "kong/plugins/response-ratelimiting/schema.lua",
            input: json!({}),
            fields: json!({"config": {"limits": "required field missing"}}),
        },
        Invalid {
            plugin: "response-ratelimiting",
            kong: "kong/plugins/response-ratelimiting/schema.lua",
            input: json!({"limits": {"video": {}}}),
            fields: json!({"config": {"limits": {"@entity": [
                "at least one of these fields must be non-empty: 'second', 'minute', 'hour', 'day', 'month', 'year'"
            ]}}}),
        },
        Invalid {
            plugin: "response-ratelimiting",
            kong: "kong/plugins/response-ratelimiting/schema.lua",
            input: json!({"limits": {"video": {"minute": 10, "hour": 5}}, "policy": "redis"}),
            fields: json!({
                "config": {
                    "limits": "the limit for hour(5.0) cannot be lower than the limit for minute(10.0)",
                    "redis": {"host": "required field missing"}
                },
                "@entity": ["failed conditional validation given value of field 'config.policy'"]
            }),
        },
        Invalid {
            plugin: "response-transformer",
            kong: "kong/plugins/response-transformer/schema.lua",
            input: json!({"add": {"json": ["k"], "json_types": ["object"]},
                          "rename": {"headers": ["x:y z"]}}),
            fields: json!({"config": {
                "add": {
                    "json": ["invalid value: k"],
                    "json_types": ["expected one of: boolean, number, string"]
                },
                "rename": {"headers": ["'y z' is not a valid header"]}
            }}),
        },
        Invalid {
            plugin: "session",
            kong: "kong/plugins/session/schema.lua",
            input: json!({"cookie_same_site": "Strictest", "logout_methods": ["PUT"],
                          "storage": "redis", "secret": ""}),
            fields: json!({"config": {
                "cookie_same_site": "expected one of: Strict, Lax, None, Default",
                "logout_methods": ["expected one of: GET, POST, DELETE"],
                "storage": "expected one of: cookie, kong",
                "secret": "length must be at least 1"
            }}),
        },
        Invalid {
            plugin: "session",
            kong: "kong/plugins/session/schema.lua (shorthand_fields)",
            input: json!({"cookie_lifetime": "long"}),
            fields: json!({"cookie_lifetime": "expected a number"}),
        },
        Invalid {
            plugin: "standard-webhooks",
            kong: "kong/plugins/standard-webhooks/schema.lua",
            input: json!({"tolerance_second": -1}),
            fields: json!({"config": {
                "secret_v1": "required field missing",
                "tolerance_second": "value must be greater than -1"
            }}),
        },
        Invalid {
            plugin: "statsd",
            kong: "kong/plugins/statsd/schema.lua",
            input: json!({"allow_status_codes": ["200-299", "2xx"], "udp_packet_size": 70000,
                          "metrics": [{"name": "unique_users", "stat_type": "set",
                                       "sample_rate": 0}],
                          "tag_style": "prometheus"}),
            fields: json!({"config": {
                "allow_status_codes": [null, "invalid value: 2xx"],
                "udp_packet_size": "value should be between 0 and 65507",
                "metrics": [{"sample_rate": "value must be greater than 0"}],
                "tag_style": "expected one of: dogstatsd, influxdb, librato, signalfx"
            }}),
        },
        Invalid {
            plugin: "syslog",
            kong: "kong/plugins/syslog/schema.lua",
            input: json!({"facility": "local8", "log_level": null}),
            fields: json!({"config": {
                "facility": "expected one of: auth, authpriv, cron, daemon, ftp, kern, lpr, mail, news, syslog, user, uucp, local0, local1, local2, local3, local4, local5, local6, local7",
                "log_level": "required field missing"
            }}),
        },
        Invalid {
            plugin: "tcp-log",
            kong: "kong/plugins/tcp-log/schema.lua",
            input: json!({"tls": true}),
            fields: json!({"config": {
                "host": "required field missing",
                "port": "required field missing"
            }}),
        },
        Invalid {
            plugin: "udp-log",
            kong: "kong/plugins/udp-log/schema.lua",
            input: json!({"host": "10.0.0.1:514", "port": -1}),
            fields: json!({"config": {
                "host": "must not have a port",
                "port": "value should be between 0 and 65535"
            }}),
        },
        Invalid {
            plugin: "zipkin",
            kong: "kong/plugins/zipkin/schema.lua",
            input: json!({"static_tags": [{"name": "lc", "value": "x"}], "traceid_byte_count": 12}),
            fields: json!({"config": {
                "static_tags": [{"name": "must not be one of: error, http.method, http.path, http.status_code, kong.balancer.state, kong.balancer.try, kong.consumer, kong.credential, kong.node.id, kong.route, kong.service, lc, peer.hostname"}],
                "traceid_byte_count": "expected one of: 8, 16"
            }}),
        },
        Invalid {
            plugin: "zipkin",
            kong: "kong/plugins/zipkin/schema.lua",
            input: json!({"static_tags": [{"name": "a", "value": "1"}, {"name": "a", "value": "2"}]}),
            fields: json!({"config": {"static_tags": "repeated tags are not allowed: a"}}),
        },
    ]
}

#[test]
fn every_bundled_plugin_has_a_schema_version_and_priority() {
    let registry = Registry::builtin();
    let mut missing = Vec::new();
    for (name, version, priority) in HANDLERS {
        match registry.plugin(name) {
            Some(p) => {
                assert_eq!(
                    (p.version.as_str(), p.priority),
                    (*version, *priority),
                    "{name}: kong/plugins/{name}/handler.lua"
                );
            }
            None => missing.push(*name),
        }
    }
    assert!(missing.is_empty(), "no schema for: {missing:?}");
    assert_eq!(registry.plugins().count(), HANDLERS.len());
}

#[test]
fn configs_are_filled_as_kong_fills_them() {
    let registry = Registry::builtin();
    let mut failures = Vec::new();
    for case in defaults() {
        let Some(res) = registry.prepare_plugin_config(case.plugin, case.input.clone()) else {
            failures.push(format!("{}: no schema", case.plugin));
            continue;
        };
        let mut filled = match res {
            Ok(filled) => filled,
            Err(e) => {
                failures.push(format!("{} ({}): {}", case.plugin, case.kong, e.message()));
                continue;
            }
        };
        for name in case.generated {
            let generated = filled.get(*name).and_then(Value::as_str).unwrap_or("");
            if generated.is_empty() {
                failures.push(format!("{}: no generated {name}", case.plugin));
            }
            filled[*name] = case.filled[*name].clone();
        }
        if filled != case.filled {
            failures.push(format!(
                "{} ({}) from {}:\n  got      {filled}\n  expected {}",
                case.plugin, case.kong, case.input, case.filled
            ));
        }
        // Filling is idempotent: the data plane validates the stored form again.
        let again = registry.prepare_plugin_config(case.plugin, filled.clone());
        if !matches!(&again, Some(Ok(v)) if *v == filled) {
            failures.push(format!(
                "{}: the filled config does not fill to itself",
                case.plugin
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_configs_get_kongs_errors() {
    let registry = Registry::builtin();
    let mut failures = Vec::new();
    for case in invalid() {
        match registry.prepare_plugin_config(case.plugin, case.input.clone()) {
            Some(Err(e)) if Value::Object(e.0.clone()) == case.fields => {}
            Some(Err(e)) => failures.push(format!(
                "{} ({}) from {}:\n  got      {}\n  expected {}",
                case.plugin,
                case.kong,
                case.input,
                Value::Object(e.0),
                case.fields
            )),
            other => failures.push(format!(
                "{} ({}): {} accepted: {other:?}",
                case.plugin, case.kong, case.input
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_plugin_has_a_defaults_case_and_an_invalid_case() {
    let with_defaults: Vec<&str> = defaults().iter().map(|c| c.plugin).collect();
    let with_invalid: Vec<&str> = invalid().iter().map(|c| c.plugin).collect();
    for name in Registry::builtin().plugins().map(|p| p.name.as_str()) {
        assert!(with_defaults.contains(&name), "{name}: no defaults case");
        assert!(with_invalid.contains(&name), "{name}: no invalid case");
    }
}

/// The deprecated `redis_*` shorthands write into `redis` and are not stored; the real field
/// wins when both are given (Kong's deprecated shorthand semantics).
#[test]
fn deprecated_shorthands_move_into_records() {
    let registry = Registry::builtin();
    let filled = registry
        .prepare_plugin_config(
            "rate-limiting",
            json!({"minute": 5, "policy": "redis", "redis_host": "r.test", "redis_port": 7000,
                   "redis": {"port": 7001}}),
        )
        .expect("described")
        .expect("valid");
    assert_eq!(filled["redis"]["host"], "r.test");
    assert_eq!(filled["redis"]["port"], 7001);
    assert!(filled.get("redis_host").is_none());

    // session's shorthands are not deprecated: they win, and may rewrite the value.
    let filled = registry
        .prepare_plugin_config(
            "session",
            json!({"cookie_samesite": "off", "cookie_lifetime": 60, "rolling_timeout": 10,
                   "cookie_idletime": null, "cookie_renew": 5}),
        )
        .expect("described")
        .expect("valid");
    assert_eq!(filled["cookie_same_site"], "Lax");
    assert_eq!(filled["rolling_timeout"], 60);
    assert_eq!(filled["idling_timeout"], 0);
    assert!(filled.get("cookie_renew").is_none());

    // acme's nested record has its own.
    let filled = registry
        .prepare_plugin_config(
            "acme",
            json!({"account_email": "a@b.test", "storage": "redis",
                   "storage_config": {"redis": {"host": "r.test", "auth": "pw",
                                                "namespace": "ns"}}}),
        )
        .expect("described")
        .expect("valid");
    let redis = &filled["storage_config"]["redis"];
    assert_eq!(redis["password"], "pw");
    assert_eq!(
        redis["extra_options"],
        json!({"namespace": "ns", "scan_count": 10})
    );
}

/// `since` comes from kong/clustering/compat/removed_fields.lua: a data plane older than the
/// version a field is listed under does not get it.
#[test]
fn fields_newer_than_a_data_plane_are_stripped() {
    let registry = Registry::builtin();
    let cases: &[(&str, Value, &str, &[&str])] = &[
        (
            "rate-limiting",
            json!({"minute": 5}),
            "3.3.0",
            &["config.redis", "config.sync_rate"],
        ),
        ("rate-limiting", json!({"minute": 5}), "3.10.0", &[]),
        (
            "ai-proxy",
            json!({"route_type": "llm/v1/chat", "auth": {"header_name": "k", "header_value": "v"},
                   "model": {"provider": "openai", "options": {}}}),
            "3.7.1",
            &[
                "config.auth.gcp_use_service_account",
                "config.auth.gcp_service_account_json",
                "config.auth.aws_access_key_id",
                "config.auth.aws_secret_access_key",
                "config.auth.allow_override",
                "config.model.options.gemini",
                "config.model.options.bedrock",
                "config.model.options.huggingface",
                "config.max_request_body_size",
                "config.model_name_header",
                "config.llm_format",
            ],
        ),
        (
            "acme",
            json!({"account_email": "a@b.test", "storage": "kong"}),
            "3.0.0",
            &[
                "config.account_key",
                "config.storage_config.redis.timeout",
                "config.storage_config.redis.username",
                "config.storage_config.redis.password",
                "config.storage_config.redis.ssl",
                "config.storage_config.redis.ssl_verify",
                "config.storage_config.redis.server_name",
                "config.storage_config.redis.extra_options",
                "config.enable_ipv4_common_name",
            ],
        ),
    ];
    for (plugin, input, dp_version, expected) in cases {
        let config = registry
            .prepare_plugin_config(plugin, input.clone())
            .expect("described")
            .unwrap_or_else(|e| panic!("{plugin}: {}", e.message()));
        let mut entity = json!({"name": plugin, "config": config});
        let mut removed = registry.strip_newer_fields("plugins", &mut entity, dp_version);
        removed.sort();
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(removed, expected, "{plugin} for a {dp_version} data plane");
    }
}

both_backends!(plugins_through_the_admin_api, |b| async move {
    let Some(cp) = TestCp::start(b).await else {
        return;
    };
    let mut rate_limiting_id = Value::Null;
    for case in defaults() {
        let r = cp
            .post(
                "/plugins",
                json!({"name": case.plugin, "config": case.input}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}: {r:?}", case.plugin);
        if case.plugin == "rate-limiting" {
            rate_limiting_id = r.body["id"].clone();
        }
        let mut config = r.body["config"].clone();
        for name in case.generated {
            config[*name] = case.filled[*name].clone();
        }
        assert_eq!(config, case.filled, "{} ({})", case.plugin, case.kong);
        let protocols = r.body["protocols"].as_array().expect("protocols").len();
        assert!(protocols > 0, "{}", case.plugin);
    }
    // On an update Kong applies a deprecated shorthand to the input before merging it, so it
    // replaces the stored value it names.
    let path = format!("/plugins/{}", rate_limiting_id.as_str().expect("an id"));
    let r = cp
        .patch(&path, json!({"config": {"redis": {"host": "old.test"}}}))
        .await;
    assert_eq!(r.body["config"]["redis"]["host"], "old.test", "{r:?}");
    let r = cp
        .patch(&path, json!({"config": {"redis_host": "new.test"}}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["config"]["redis"]["host"], "new.test");
    assert_eq!(r.body["config"]["redis"]["port"], 6379);
    assert_eq!(r.body["config"]["minute"], 5);
    assert!(r.body["config"].get("redis_host").is_none());

    let r = cp
        .post(
            "/plugins",
            json!({"name": "rate-limiting", "config": {"minute": 5, "hour": 1}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["name"], "schema violation");
    assert_eq!(
        r.body["message"],
        "schema violation (config: The limit for hour(1.0) cannot be lower than the limit for minute(5.0))"
    );
    // Scoped to a service, so that the global key-auth above is no conflict.
    let service = cp
        .create("/services", json!({"name": "s", "host": "s.test"}))
        .await;
    let r = cp
        .post(
            "/plugins",
            json!({"name": "key-auth", "protocols": ["tcp"], "service": {"id": service["id"]},
                   "consumer": {"id": "6f1b0d5e-5c4b-4c1e-9a43-7d1f0e0c0a01"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    assert_eq!(r.body["fields"]["consumer"], "value must be null");
    assert_eq!(
        r.body["fields"]["protocols"],
        json!([format!("expected one of: {}", HTTP.join(", "))])
    );
    cp.shutdown().await;
});
