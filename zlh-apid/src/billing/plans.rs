//! The plans a user can subscribe to and the resource limits each one grants. The plans are fixed
//! here; only their price ids at the payment provider come from the config (`stripe_prices`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::db::Db;

use super::subscriptions::{self, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanId {
    Basic,
    Standard,
    Pro,
}

impl PlanId {
    pub const ALL: [PlanId; 3] = [PlanId::Basic, PlanId::Standard, PlanId::Pro];

    pub fn as_str(self) -> &'static str {
        match self {
            PlanId::Basic => "basic",
            PlanId::Standard => "standard",
            PlanId::Pro => "pro",
        }
    }

    pub fn parse(s: &str) -> Result<Self, UnknownPlan> {
        Self::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| UnknownPlan(s.to_string()))
    }

    pub fn plan(self) -> &'static Plan {
        match self {
            PlanId::Basic => &BASIC,
            PlanId::Standard => &STANDARD,
            PlanId::Pro => &PRO,
        }
    }
}

impl fmt::Display for PlanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown plan {0:?} (plans: basic, standard, pro)")]
pub struct UnknownPlan(pub String);

/// What a plan grants its subscriber: each server at most `memory_mb` and `disk_gb`, and all of
/// them together at most `servers` servers, `total_memory_mb` and `total_disk_gb`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub id: PlanId,
    pub name: &'static str,
    pub memory_mb: u32,
    pub disk_gb: u32,
    pub servers: u32,
    pub total_memory_mb: u32,
    pub total_disk_gb: u32,
}

pub const BASIC: Plan = Plan {
    id: PlanId::Basic,
    name: "Basic",
    memory_mb: 1024,
    disk_gb: 10,
    servers: 2,
    total_memory_mb: 2048,
    total_disk_gb: 20,
};
pub const STANDARD: Plan = Plan {
    id: PlanId::Standard,
    name: "Standard",
    memory_mb: 2048,
    disk_gb: 20,
    servers: 5,
    total_memory_mb: 8192,
    total_disk_gb: 100,
};
pub const PRO: Plan = Plan {
    id: PlanId::Pro,
    name: "Pro",
    memory_mb: 4096,
    disk_gb: 50,
    servers: 10,
    total_memory_mb: 32768,
    total_disk_gb: 500,
};

/// What a user without a subscription gets when subscriptions are not required.
pub const DEFAULT_PLAN: PlanId = PlanId::Basic;

impl Plan {
    pub fn all() -> [&'static Plan; 3] {
        PlanId::ALL.map(PlanId::plan)
    }

    pub fn parse(s: &str) -> Result<&'static Plan, UnknownPlan> {
        PlanId::parse(s).map(PlanId::plan)
    }
}

/// The plan a provider's price id stands for (subscription events name prices, not plans).
pub fn plan_for_price(prices: &BTreeMap<PlanId, String>, price_id: &str) -> Option<PlanId> {
    prices.iter().find(|(_, p)| p.as_str() == price_id).map(|(plan, _)| *plan)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("the {plan} plan allows {allowed} MB of memory per server; {requested} MB requested (upgrade the plan)")]
    Memory { plan: PlanId, allowed: u32, requested: u32 },
    #[error("the {plan} plan allows {allowed} GB of disk per server; {requested} GB requested (upgrade the plan)")]
    Disk { plan: PlanId, allowed: u32, requested: u32 },
    #[error("the {} plan allows {allowed} servers; you have {have} (delete one or upgrade the plan)", .plan.plan().name)]
    Servers { plan: PlanId, allowed: u32, have: u32 },
    #[error(
        "the {} plan allows {allowed} MB of memory in all; your servers have {used} MB and this one asks for \
         {requested} MB (delete one or upgrade the plan)",
        .plan.plan().name
    )]
    TotalMemory { plan: PlanId, allowed: u32, used: u64, requested: u32 },
    #[error(
        "the {} plan allows {allowed} GB of disk in all; your servers have {used} GB and this one asks for \
         {requested} GB (delete one or upgrade the plan)",
        .plan.plan().name
    )]
    TotalDisk { plan: PlanId, allowed: u32, used: u64, requested: u32 },
}

/// What a user's servers hold now: those not deleted and not failed (a failed provision gave its
/// container and numbers back).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub servers: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
}

/// Refuses one more server of `memory_mb` / `disk_gb` beyond what the plan allows in all.
pub fn check_totals(plan: &Plan, usage: Usage, memory_mb: u32, disk_gb: u32) -> Result<(), LimitError> {
    if usage.servers >= plan.servers {
        return Err(LimitError::Servers { plan: plan.id, allowed: plan.servers, have: usage.servers });
    }
    if usage.memory_mb + u64::from(memory_mb) > u64::from(plan.total_memory_mb) {
        let (allowed, used) = (plan.total_memory_mb, usage.memory_mb);
        return Err(LimitError::TotalMemory { plan: plan.id, allowed, used, requested: memory_mb });
    }
    if usage.disk_gb + u64::from(disk_gb) > u64::from(plan.total_disk_gb) {
        let (allowed, used) = (plan.total_disk_gb, usage.disk_gb);
        return Err(LimitError::TotalDisk { plan: plan.id, allowed, used, requested: disk_gb });
    }
    Ok(())
}

/// Refuses a server that asks for more than its owner's plan grants.
pub fn check_limits(plan: &Plan, requested_memory_mb: u32, requested_disk_gb: u32) -> Result<(), LimitError> {
    if requested_memory_mb > plan.memory_mb {
        return Err(LimitError::Memory { plan: plan.id, allowed: plan.memory_mb, requested: requested_memory_mb });
    }
    if requested_disk_gb > plan.disk_gb {
        return Err(LimitError::Disk { plan: plan.id, allowed: plan.disk_gb, requested: requested_disk_gb });
    }
    Ok(())
}

/// The plan of the user's subscription if it is `active`; `None` otherwise (no subscription,
/// or inactive, past due, canceled, suspended).
pub async fn limits_for_user(db: &Db, user_id: &str) -> Result<Option<&'static Plan>, sqlx::Error> {
    Ok(subscriptions::get(db, user_id).await?.filter(|s| s.status == Status::Active).map(|s| s.plan.plan()))
}

/// Why a user may not provision right now. Sent as 402 Payment Required.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvisionRefusal {
    #[error("an active subscription is required to create servers: choose a plan under billing")]
    NoSubscription,
    #[error("the subscription is past due: update the payment method under billing to create servers")]
    PastDue,
    #[error("the subscription is suspended for non-payment: pay the open invoice under billing")]
    Suspended,
}

/// The plan whose limits apply when this user provisions a server, or why they may not.
/// `require_subscription` false (the local provider's default) lets users without an active
/// subscription provision within [`DEFAULT_PLAN`]; a payment problem refuses in either mode.
pub async fn provisioning_plan(
    db: &Db,
    require_subscription: bool,
    user_id: &str,
) -> Result<Result<&'static Plan, ProvisionRefusal>, sqlx::Error> {
    let sub = subscriptions::get(db, user_id).await?;
    Ok(match sub.map(|s| (s.status, s.plan)) {
        Some((Status::Active, plan)) => Ok(plan.plan()),
        Some((Status::PastDue, _)) => Err(ProvisionRefusal::PastDue),
        Some((Status::Suspended, _)) => Err(ProvisionRefusal::Suspended),
        _ if require_subscription => Err(ProvisionRefusal::NoSubscription),
        _ => Ok(DEFAULT_PLAN.plan()),
    })
}
