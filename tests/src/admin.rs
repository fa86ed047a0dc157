//! The syncer's authenticated API as the harness uses it: define and preheat sales, read
//! them, confirm and cancel orders.

use serde_json::{json, Value};

use crate::stack::{credential_for, rfc3339, ADMIN_SECRET};

pub struct Admin<'a> {
    http: &'a reqwest::Client,
    base: String,
}

impl<'a> Admin<'a> {
    pub fn new(http: &'a reqwest::Client, base: String) -> Self {
        Self { http, base }
    }

    pub async fn define_sale(
        &self,
        goods_id: &str,
        stock: u64,
        per_user_limit: u32,
        (starts_at_ms, ends_at_ms): (i64, i64),
        payment_window_s: u32,
    ) -> anyhow::Result<()> {
        let window = (starts_at_ms, ends_at_ms);
        self.define_sale_tier(
            goods_id,
            stock,
            per_user_limit,
            window,
            payment_window_s,
            None,
        )
        .await
    }

    /// Defines a sale decided by `tier` (`redis`, `db`, `dual_write`; None: the default).
    pub async fn define_sale_tier(
        &self,
        goods_id: &str,
        stock: u64,
        per_user_limit: u32,
        (starts_at_ms, ends_at_ms): (i64, i64),
        payment_window_s: u32,
        tier: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut spec = json!({
            "total_stock": stock,
            "per_user_limit": per_user_limit,
            "starts_at": rfc3339(starts_at_ms),
            "ends_at": rfc3339(ends_at_ms),
            "payment_window_s": payment_window_s,
        });
        if let Some(tier) = tier {
            spec["tier"] = json!(tier);
        }
        let (status, body) = self.try_define(goods_id, &spec).await?;
        anyhow::ensure!((200..300).contains(&status), "define sale: {status} {body}");
        Ok(())
    }

    /// Sends a sale definition as given (refusals included): the HTTP status and body.
    pub async fn try_define(&self, goods_id: &str, spec: &Value) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .put(format!("{}/admin/sales/{goods_id}", self.base))
            .header(seckill_api::SECRET_HEADER, ADMIN_SECRET)
            .json(spec)
            .send()
            .await?;
        status_and_body(response).await
    }

    pub async fn preheat(&self, goods_id: &str, force: bool) -> anyhow::Result<Value> {
        let (status, body) = self.try_preheat(goods_id, force).await?;
        anyhow::ensure!((200..300).contains(&status), "preheat: {status} {body}");
        Ok(body)
    }

    /// Asks for a preheat; returns the HTTP status and body, refusals included.
    pub async fn try_preheat(&self, goods_id: &str, force: bool) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(format!(
                "{}/admin/sales/{goods_id}/preheat?force={force}",
                self.base
            ))
            .header(seckill_api::SECRET_HEADER, ADMIN_SECRET)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    /// The sale's definition (MySQL) and live counters (Redis).
    pub async fn sale(&self, goods_id: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/admin/sales/{goods_id}", self.base))
            .header(seckill_api::SECRET_HEADER, ADMIN_SECRET)
            .send()
            .await?
            .json()
            .await?)
    }

    /// Whether the goods is decided in MySQL right now (`definition.fallback` of
    /// `GET /admin/sales/{goods}`); an error if the answer has no such field.
    pub async fn fallback(&self, goods_id: &str) -> anyhow::Result<bool> {
        let sale = self.sale(goods_id).await?;
        sale["definition"]["fallback"]
            .as_bool()
            .ok_or_else(|| anyhow::anyhow!("no definition.fallback in {sale}"))
    }

    /// A sale control (`pause`, `resume`, `stop`, `add-stock`) through the admin API, with an
    /// optional JSON body; returns the status and body, refusals included.
    pub async fn control(
        &self,
        goods_id: &str,
        action: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .post(format!("{}/admin/sales/{goods_id}/{action}", self.base))
            .header(seckill_api::SECRET_HEADER, ADMIN_SECRET);
        if let Some(body) = body {
            request = request.json(body);
        }
        status_and_body(request.send().await?).await
    }

    /// `GET /admin/sales` with a query string (say `limit=2&after=g1`).
    pub async fn list(&self, query: &str) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .get(format!("{}/admin/sales?{query}", self.base))
            .header(seckill_api::SECRET_HEADER, ADMIN_SECRET)
            .send()
            .await?;
        status_and_body(response).await
    }

    /// Confirms (`confirm`) or cancels (`cancel`) an order; returns the status and body.
    pub async fn settle(&self, order_id: &str, action: &str) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}/v1/orders/{order_id}/{action}", self.base))
            .header(
                seckill_api::SECRET_HEADER,
                credential_for(&format!("/v1/orders/{order_id}/{action}")),
            )
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }
}

/// A response's status and body: its JSON, or its text as a JSON string when it is not JSON.
pub async fn status_and_body(response: reqwest::Response) -> anyhow::Result<(u16, Value)> {
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}
