//! The one reply a request gets, decided by the steps as a value, and the one
//! function that writes it and settles the request's credit hold as the reply
//! says. `respond` builds the bytes; this decides what is sent and what it
//! costs.

use std::sync::Arc;

use pingora::prelude::*;

use super::{Ctx, Gateway};
use crate::answer::Answer;
use crate::cache::Entry;
use crate::reject::Reject;
use crate::respond::{self, Common, Sink};

/// What the gateway answers, and what becomes of the charge.
pub struct Reply {
    kind: Kind,
    settle: Settle,
}

enum Kind {
    /// A backend's answer: from the cache (`HIT`, `STALE`, with its age in
    /// seconds) or from a race (`MISS`, `BYPASS`).
    Proxied {
        answer: Served,
        x_cache: &'static str,
        age: Option<u64>,
    },
    /// A gateway-made JSON error.
    Reject(Reject),
}

enum Served {
    Cached(Arc<Entry>),
    Raced(Answer),
}

/// What happens to the request's credit hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Kept once the answer is written; a request dropped before that
    /// costs nothing (the hold refunds when dropped).
    OnDelivery,
    /// Given back before the answer is written, which will not be
    /// delivered (a failure).
    Refund,
    /// Given back before the answer is written, which is delivered free (a
    /// cache hit without `charge_cache_hits`).
    Free,
    /// Stands whether or not the answer goes out.
    Keep,
    /// Left to the hold: a reject before the charge has none, and an
    /// error answer leaves it to be refunded when the request is dropped.
    Untouched,
}

impl Reply {
    /// Refused, or failed, before anything was charged for.
    pub fn reject(reject: Reject) -> Reply {
        Reply {
            kind: Kind::Reject(reject),
            settle: Settle::Untouched,
        }
    }

    /// No backend answered: the failure, refunded (`refund_on_failure`) or
    /// charged at the route's price.
    pub fn failed(reject: Reject, refund: bool) -> Reply {
        Reply {
            kind: Kind::Reject(reject),
            settle: if refund { Settle::Refund } else { Settle::Keep },
        }
    }

    /// A cached entry (`HIT` or `STALE`) as of `now` (unix ms); free unless
    /// `charge_cache_hits`.
    pub fn cached(entry: Arc<Entry>, now: u64, x_cache: &'static str, charge: bool) -> Reply {
        let age = entry.age_secs(now);
        Reply {
            kind: Kind::Proxied {
                answer: Served::Cached(entry),
                x_cache,
                age: Some(age),
            },
            settle: if charge {
                Settle::OnDelivery
            } else {
                Settle::Free
            },
        }
    }

    /// A race's winning answer (`MISS` when stored for the cache, `BYPASS`
    /// when the route does not cache).
    pub fn raced(answer: Answer, x_cache: &'static str) -> Reply {
        Reply {
            kind: Kind::Proxied {
                answer: Served::Raced(answer),
                x_cache,
                age: None,
            },
            settle: Settle::OnDelivery,
        }
    }

    /// The HTTP status it will have.
    pub fn status(&self) -> u16 {
        match &self.kind {
            Kind::Proxied { answer, .. } => answer.answer().status,
            Kind::Reject(r) => r.status(),
        }
    }

    /// Its `X-Cache`, for a backend's answer.
    pub fn x_cache(&self) -> Option<&'static str> {
        match &self.kind {
            Kind::Proxied { x_cache, .. } => Some(x_cache),
            Kind::Reject(_) => None,
        }
    }

    /// The gateway-made error, if it is one.
    pub fn rejected(&self) -> Option<Reject> {
        match &self.kind {
            Kind::Reject(r) => Some(*r),
            Kind::Proxied { .. } => None,
        }
    }

    /// The backend's answer, if it is one.
    pub fn answer(&self) -> Option<&Answer> {
        match &self.kind {
            Kind::Proxied { answer, .. } => Some(answer.answer()),
            Kind::Reject(_) => None,
        }
    }
}

impl Served {
    fn answer(&self) -> &Answer {
        match self {
            Served::Cached(entry) => &entry.answer,
            Served::Raced(answer) => answer,
        }
    }
}

impl Gateway {
    /// The one place that answers a request: settle the charge as the reply
    /// says, write it, and keep the charge once a backend's answer is out.
    pub(super) async fn send(
        &self,
        sink: &mut impl Sink,
        ctx: &mut Ctx,
        reply: Reply,
    ) -> Result<bool> {
        self.settle_before(ctx, &reply).await;
        match &reply.kind {
            Kind::Reject(reject) => ctx.reject = Some(*reject),
            Kind::Proxied { x_cache, .. } => ctx.cache.status = Some(x_cache),
        }
        let extra = ctx.headers();
        let common = Common {
            request_id: &ctx.request_id,
            head: ctx.head,
            extra: &extra,
        };
        match &reply.kind {
            Kind::Reject(reject) => respond::reject(sink, &common, *reject).await?,
            Kind::Proxied {
                answer,
                x_cache,
                age,
            } => respond::proxied(sink, &common, answer.answer(), x_cache, *age).await?,
        }
        Self::delivered(ctx, &reply);
        Ok(true)
    }

    /// Before the reply is written: refund or keep the charge, if it says so.
    pub(super) async fn settle_before(&self, ctx: &mut Ctx, reply: &Reply) {
        let Some(hold) = ctx.admit.hold.as_mut() else {
            return;
        };
        match reply.settle {
            Settle::Refund | Settle::Free => {
                if let Err(e) = hold.refund(reply.settle == Settle::Free).await {
                    self.metrics.store_error("refund");
                    log::warn!("store refund failed: {e}");
                }
            }
            Settle::Keep => hold.keep(),
            Settle::OnDelivery | Settle::Untouched => {}
        }
    }

    /// The reply was written: a delivered answer's charge stands, and a
    /// cached one counts as a cache hit in the usage ledger.
    pub(super) fn delivered(ctx: &mut Ctx, reply: &Reply) {
        let Some(hold) = ctx.admit.hold.as_mut() else {
            return;
        };
        if reply.settle == Settle::OnDelivery {
            hold.keep();
        }
        if let Kind::Proxied {
            answer: Served::Cached(_),
            ..
        } = reply.kind
        {
            hold.cache_hit();
        }
    }
}
