//! `multipart/form-data` image edit requests (`POST /v1/images/edits`, or the job API): the
//! files, and the text fields typed into an [`ImageGenerationRequest`], as the OpenAI SDKs
//! send them.

use axum::body::Bytes;
use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::StatusCode;
use serde_json::{Map, Number, Value};

use super::api::ImageGenerationRequest;
use super::error::{is_body_timeout, ApiError};

/// A parsed edit form.
pub struct EditForm {
    pub request: ImageGenerationRequest,
    pub strength: Option<f64>,
    pub image: Bytes,
    pub mask: Option<Bytes>,
}

/// Text fields that carry integers, numbers and booleans; the rest are strings.
const INTEGERS: [&str; 5] = ["n", "output_compression", "steps", "seed", "partial_images"];
const NUMBERS: [&str; 3] = ["guidance_scale", "eta", "strength"];
// (and `weight`, in the bracket form of `loras`)
const BOOLEANS: [&str; 1] = ["stream"];

fn multipart_error(e: MultipartError) -> ApiError {
    if is_body_timeout(&e) {
        ApiError::body_timeout()
    } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(format!("request body too large: {}", e.body_text()))
    } else {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text())).code("invalid_body")
    }
}

/// A form text field as the JSON value the request type expects.
fn typed(name: &str, text: String) -> Result<Value, ApiError> {
    let invalid = |what: &str| ApiError::invalid(name, format!("{name} must be {what}, got {text:?}")).code("invalid_type");
    let trimmed = text.trim();
    if INTEGERS.contains(&name) {
        let n = match trimmed.parse::<i64>() {
            Ok(v) => Number::from(v),
            Err(_) => Number::from(trimmed.parse::<u64>().map_err(|_| invalid("an integer"))?),
        };
        Ok(Value::Number(n))
    } else if NUMBERS.contains(&name) || name == "weight" {
        let v = trimmed.parse::<f64>().ok().and_then(Number::from_f64).ok_or_else(|| invalid("a finite number"))?;
        Ok(Value::Number(v))
    } else if BOOLEANS.contains(&name) {
        match trimmed {
            "true" | "1" => Ok(Value::Bool(true)),
            "false" | "0" => Ok(Value::Bool(false)),
            _ => Err(invalid("true or false")),
        }
    } else if name == "loras" {
        serde_json::from_str(trimmed).map_err(|_| invalid(r#"a JSON array such as [{"name": "style", "weight": 0.8}]"#))
    } else {
        Ok(Value::String(text))
    }
}

/// The OpenAI SDKs' `extra_body` form of the adapters: `loras[][name]` and `loras[][weight]`,
/// paired in order (every adapter must then give a weight, or none does).
fn bracket_loras(names: Vec<String>, weights: Vec<String>) -> Result<Value, ApiError> {
    if !weights.is_empty() && weights.len() != names.len() {
        return Err(ApiError::invalid(
            "loras",
            format!(
                "got {} loras[][name] but {} loras[][weight] fields, which cannot be paired; send loras as one JSON field, e.g. loras=[{{\"name\": \"style\", \"weight\": 0.8}}]",
                names.len(),
                weights.len()
            ),
        ));
    }
    let mut list = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let mut entry = Map::from_iter([("name".to_string(), Value::String(name))]);
        if let Some(w) = weights.get(i) {
            entry.insert("weight".into(), typed("weight", w.clone()).map_err(|e| e.param(format!("loras[{i}].weight")))?);
        }
        list.push(Value::Object(entry));
    }
    Ok(Value::Array(list))
}

impl EditForm {
    /// Reads every field of the form.
    pub async fn parse(mut multipart: Multipart) -> Result<Self, ApiError> {
        let mut fields = Map::new();
        let (mut image, mut mask) = (None::<Bytes>, None::<Bytes>);
        let (mut names, mut weights) = (Vec::new(), Vec::new());
        while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
            let name = field.name().unwrap_or_default().to_string();
            match name.as_str() {
                "image" | "image[]" | "mask" => {
                    let bytes = field.bytes().await.map_err(multipart_error)?;
                    let slot = if name == "mask" { &mut mask } else { &mut image };
                    if slot.replace(bytes).is_some() {
                        let which = if name == "mask" { "mask" } else { "image" };
                        return Err(ApiError::invalid(which, format!("send one {which} file; this server edits one image at a time")));
                    }
                }
                _ => {
                    let text = field.text().await.map_err(multipart_error)?;
                    match name.as_str() {
                        "loras[][name]" => names.push(text),
                        "loras[][weight]" => weights.push(text),
                        _ => {
                            fields.insert(name.clone(), typed(&name, text)?);
                        }
                    }
                }
            }
        }
        if !names.is_empty() || !weights.is_empty() {
            if fields.contains_key("loras") {
                return Err(ApiError::invalid("loras", "give loras either as one JSON field or as loras[][name] fields, not both"));
            }
            fields.insert("loras".into(), bracket_loras(names, weights)?);
        }
        let image = image.ok_or_else(|| ApiError::invalid("image", "the form has no image file (field `image`)"))?;
        let strength = fields.remove("strength").and_then(|v| v.as_f64());
        let request: ImageGenerationRequest = serde_path_to_error::deserialize(Value::Object(fields)).map_err(|e| {
            let path = e.path().to_string();
            let message = format!("invalid value for `{path}`: {}", e.inner());
            let error = ApiError::bad_request(message).code("invalid_type");
            if path == "." { error } else { error.param(path) }
        })?;
        Ok(Self { request, strength, image, mask })
    }
}

impl<S: Send + Sync> FromRequest<S> for EditForm {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let multipart = Multipart::from_request(req, state).await.map_err(|e| {
            ApiError::new(e.status(), super::error::ErrorType::InvalidRequestError, format!("expected a multipart/form-data body: {}", e.body_text()))
                .code("invalid_body")
        })?;
        Self::parse(multipart).await
    }
}
