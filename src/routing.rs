//! Which target of a route serves a request.
//!
//! For now the first target of the route; weighted balancing, health and
//! failover order arrive with the resilience work and slot in here.

use crate::config::{Route, Target};

/// Targets to try, in order.
pub fn plan(route: &Route) -> impl Iterator<Item = &Target> {
    route.targets.iter().take(1)
}
