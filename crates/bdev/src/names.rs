//! The names of a registry's controllers and bdevs: one namespace, each name held by
//! one controller.
//!
//! A controller's name is reserved before it connects; the names of its bdevs are
//! claimed, all or none, before it joins the registry; a LUN found later (hot-plug,
//! rescan) claims its bdev name before its bdev exists, and is left out if another
//! controller holds the name. Everything a controller holds is given back at once
//! when it leaves the registry (or its attach fails); a controller that left can claim
//! nothing more (its event thread may still be winding down).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::BdevError;

/// Who holds a name.
#[derive(Debug, Clone)]
struct Holder {
    /// The holding controller's attach (a re-attach under the same name is another).
    id: u64,
    controller: String,
    /// The name is (also) one of the controller's bdevs.
    bdev: bool,
}

impl Holder {
    fn describe(&self, name: &str) -> String {
        if self.bdev {
            format!("bdev {name} of controller {}", self.controller)
        } else {
            format!("controller {}", self.controller)
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    held: HashMap<String, Holder>,
    /// Attaches that may still claim names: whether the controller joined the
    /// registry (false: its attach is under way).
    live: HashMap<u64, bool>,
    next_id: u64,
}

/// Every controller and bdev name of a registry.
#[derive(Debug, Default)]
pub(crate) struct Names {
    inner: Mutex<Inner>,
}

impl Names {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserve `controller` for a controller about to attach. Refused while anything
    /// else has the name.
    pub(crate) fn reserve(self: &Arc<Self>, controller: &str) -> Result<NameOwner, BdevError> {
        let mut st = self.lock();
        if let Some(h) = st.held.get(controller) {
            return Err(if h.bdev && h.controller != controller {
                BdevError::NameHeld {
                    controller: controller.to_string(),
                    name: controller.to_string(),
                    held: h.describe(controller),
                    holder: h.controller.clone(),
                }
            } else if st.live.get(&h.id) == Some(&false) {
                BdevError::Attaching(controller.to_string())
            } else {
                BdevError::NameTaken(controller.to_string())
            });
        }
        st.next_id += 1;
        let id = st.next_id;
        st.live.insert(id, false);
        st.held.insert(
            controller.to_string(),
            Holder {
                id,
                controller: controller.to_string(),
                bdev: false,
            },
        );
        Ok(NameOwner {
            claims: NameClaims {
                names: self.clone(),
                id,
                controller: controller.to_string(),
            },
        })
    }
}

/// The right to a controller's names; everything it holds is given back on drop.
#[derive(Debug)]
pub(crate) struct NameOwner {
    claims: NameClaims,
}

impl NameOwner {
    /// The controller joined the registry: its attach is over.
    pub(crate) fn joined(&self) {
        if let Some(j) = self.claims.names.lock().live.get_mut(&self.claims.id) {
            *j = true;
        }
    }

    /// What the controller claims its bdevs' names with.
    pub(crate) fn claims(&self) -> &NameClaims {
        &self.claims
    }
}

impl Drop for NameOwner {
    fn drop(&mut self) {
        let id = self.claims.id;
        let mut st = self.claims.names.lock();
        st.live.remove(&id);
        st.held.retain(|_, h| h.id != id);
    }
}

/// Claims bdev names for one controller (its attach, its event thread).
#[derive(Debug, Clone)]
pub(crate) struct NameClaims {
    names: Arc<Names>,
    id: u64,
    controller: String,
}

impl NameClaims {
    /// Claims in a table of their own, for a controller attached without a registry.
    pub(crate) fn standalone(controller: &str) -> NameClaims {
        let owner = Arc::new(Names::default())
            .reserve(controller)
            .expect("an empty table has every name free");
        let claims = owner.claims.clone();
        // Nothing else uses the table: the names stay held as long as the claims live.
        std::mem::forget(owner);
        claims
    }

    /// Claim every name of `bdevs`, or none: an error names the first one another
    /// controller holds.
    pub(crate) fn claim_bdevs<S: AsRef<str>>(&self, bdevs: &[S]) -> Result<(), BdevError> {
        let mut st = self.names.lock();
        if !st.live.contains_key(&self.id) {
            return Err(BdevError::NotFound(self.controller.clone()));
        }
        for b in bdevs {
            let b = b.as_ref();
            if let Some(h) = st.held.get(b).filter(|h| h.id != self.id) {
                return Err(BdevError::NameHeld {
                    controller: self.controller.clone(),
                    name: b.to_string(),
                    held: h.describe(b),
                    holder: h.controller.clone(),
                });
            }
        }
        for b in bdevs {
            st.held.insert(
                b.as_ref().to_string(),
                Holder {
                    id: self.id,
                    controller: self.controller.clone(),
                    bdev: true,
                },
            );
        }
        Ok(())
    }

    /// Give back the name of a bdev that is gone (a removed LUN).
    pub(crate) fn release_bdev(&self, bdev: &str) {
        let mut st = self.names.lock();
        if bdev == self.controller {
            if let Some(h) = st.held.get_mut(bdev).filter(|h| h.id == self.id) {
                h.bdev = false;
            }
        } else if st.held.get(bdev).is_some_and(|h| h.id == self.id) {
            st.held.remove(bdev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_has_one_holder_and_is_free_again_when_its_controller_goes() {
        let names = Arc::new(Names::default());
        let blk = names.reserve("Ct0").unwrap();
        blk.claims().claim_bdevs(&["Ct0"]).unwrap();
        let scsi = names.reserve("C").unwrap();
        // All or nothing: Ct0l1 is not kept when Ct0 is refused.
        let e = scsi.claims().claim_bdevs(&["Ct0l1", "Ct0"]).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::AlreadyExists);
        let msg = e.to_string();
        assert!(msg.contains("bdev Ct0 of controller Ct0"), "{msg}");
        let other = names.reserve("D").unwrap();
        other.claims().claim_bdevs(&["Ct0l1"]).unwrap();
        // A controller named like another's bdev is refused, naming it.
        let e = names.reserve("Ct0l1").unwrap_err();
        assert!(e.to_string().contains("of controller D"), "{e}");
        // An attach under way says so; an attached controller is simply there.
        assert!(matches!(names.reserve("C"), Err(BdevError::Attaching(_))));
        scsi.joined();
        assert!(matches!(names.reserve("C"), Err(BdevError::NameTaken(_))));
        drop(blk);
        scsi.claims().claim_bdevs(&["Ct0"]).unwrap();
        // A removed LUN gives its name back.
        scsi.claims().release_bdev("Ct0");
        let again = names.reserve("Ct0").unwrap();
        // A controller that left claims nothing more; all its names are free.
        let late = other.claims().clone();
        drop(other);
        assert!(late.claim_bdevs(&["Dt0"]).is_err());
        again.claims().claim_bdevs(&["Ct0", "Ct0l1"]).unwrap();
    }
}
