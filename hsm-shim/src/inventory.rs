//! What the token holds: every object the logged-in user can see, with the
//! attributes drift detection compares against custody's registry.
//!
//! Another process (a replica on the same token) may destroy an object
//! between the search that names it and the reads of its attributes; the
//! listing leaves it out, as a listing a moment later would, instead of
//! failing or reporting it half-read (see the module docs of `session.rs`).

use cryptoki::context::Function;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};

use crate::error::{HsmError, Result};
use crate::session::{HsmSession, is_stale_handle};
use crate::types::{KeyCheckValue, KeyLabel};

/// The class of an object, as drift detection names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectClassName {
    /// `CKO_PRIVATE_KEY`.
    Private,
    /// `CKO_PUBLIC_KEY`.
    Public,
    /// `CKO_SECRET_KEY`.
    Secret,
    /// Anything else (certificates, data objects).
    Other,
}

impl ObjectClassName {
    /// Lower-case name: private, public, secret, other.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectClassName::Private => "private",
            ObjectClassName::Public => "public",
            ObjectClassName::Secret => "secret",
            ObjectClassName::Other => "other",
        }
    }
}

/// One object on the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSummary {
    /// Its class.
    pub class: ObjectClassName,
    /// `CKA_LABEL`, lossily decoded.
    pub label: String,
    /// `CKA_ID`, lossily decoded.
    pub id: String,
    /// `CKA_SENSITIVE`, if the object has it.
    pub sensitive: Option<bool>,
    /// `CKA_EXTRACTABLE`, if the object has it.
    pub extractable: Option<bool>,
    /// For a public key of a type custody uses: its SubjectPublicKeyInfo DER.
    pub public_key_der: Option<Vec<u8>>,
    /// For an AES key: its key check value, if the module gives one.
    pub check_value: Option<KeyCheckValue>,
}

impl HsmSession {
    /// Every object the session can see (token and session objects, public
    /// and private), with the attributes of [`ObjectSummary`].
    pub fn inventory(&mut self) -> Result<Vec<ObjectSummary>> {
        self.recovering(|s| {
            // Logged out (by an SO step whose login met a failing device),
            // the list would silently lack every private object.
            s.ensure_logged_in()?;
            let handles = s.call(
                Function::FindObjectsInit,
                || "listing the token's objects".into(),
                |session| session.find_objects(&[]),
            )?;
            let context = KeyLabel::new("inventory")?;
            let mut objects = Vec::with_capacity(handles.len());
            for handle in handles {
                let attributes = s.attributes(
                    handle,
                    &[
                        AttributeType::Class,
                        AttributeType::Label,
                        AttributeType::Id,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                    ],
                    &context,
                );
                let Some(attributes) = unless_vanished(attributes)? else {
                    continue;
                };
                let mut object = ObjectSummary {
                    class: ObjectClassName::Other,
                    label: String::new(),
                    id: String::new(),
                    sensitive: None,
                    extractable: None,
                    public_key_der: None,
                    check_value: None,
                };
                for attribute in attributes {
                    match attribute {
                        Attribute::Class(class) => {
                            object.class = match class {
                                ObjectClass::PRIVATE_KEY => ObjectClassName::Private,
                                ObjectClass::PUBLIC_KEY => ObjectClassName::Public,
                                ObjectClass::SECRET_KEY => ObjectClassName::Secret,
                                _ => ObjectClassName::Other,
                            }
                        }
                        Attribute::Label(bytes) => {
                            object.label = String::from_utf8_lossy(&bytes).into_owned()
                        }
                        Attribute::Id(bytes) => {
                            object.id = String::from_utf8_lossy(&bytes).into_owned()
                        }
                        Attribute::Sensitive(v) => object.sensitive = Some(v),
                        Attribute::Extractable(v) => object.extractable = Some(v),
                        _ => {}
                    }
                }
                let label = KeyLabel::new(object.label.clone()).unwrap_or(context.clone());
                // A key of a type custody does not use has no SPKI here, and
                // a module may give no KCV; drift detection reports what is
                // missing. A key that vanished meanwhile is left out.
                let vanished = match object.class {
                    ObjectClassName::Public => {
                        let public_key = s
                            .read_spec(handle, &label)
                            .and_then(|spec| s.read_public_key(handle, spec, &label));
                        match public_key {
                            Err(error) if vanished(&error) => true,
                            read => {
                                object.public_key_der = read.ok().map(|k| k.spki_der().to_vec());
                                false
                            }
                        }
                    }
                    ObjectClassName::Secret => match s.check_value(handle, &label) {
                        Err(error) if vanished(&error) => true,
                        read => {
                            object.check_value = read.ok();
                            false
                        }
                    },
                    _ => false,
                };
                if !vanished {
                    objects.push(object);
                }
            }
            Ok(objects)
        })
    }

    /// Destroys every object with neither a label nor an id, and returns
    /// how many there were. SoftHSM2 makes an object first and writes its
    /// template after, so a process killed inside `C_CreateObject`,
    /// `C_GenerateKey` or `C_UnwrapKey` can leave an object with default
    /// attributes that no label finds; custody never makes such an object.
    /// Call it only after a roll-back, when such a torn object is expected.
    pub fn destroy_unnamed(&mut self) -> Result<usize> {
        self.recovering(|s| {
            let handles = s.call(
                Function::FindObjectsInit,
                || "listing the token's objects".into(),
                |session| session.find_objects(&[]),
            )?;
            let context = KeyLabel::new("unnamed-object")?;
            let mut destroyed = 0;
            for handle in handles {
                let attributes =
                    s.attributes(handle, &[AttributeType::Label, AttributeType::Id], &context);
                let Some(attributes) = unless_vanished(attributes)? else {
                    continue;
                };
                let unnamed = attributes.iter().all(|attribute| match attribute {
                    Attribute::Label(bytes) | Attribute::Id(bytes) => bytes.is_empty(),
                    _ => true,
                });
                if unnamed {
                    let gone = s.call(
                        Function::DestroyObject,
                        || "destroying an object with neither label nor id".into(),
                        |session| session.destroy_object(handle),
                    );
                    if unless_vanished(gone)?.is_some() {
                        destroyed += 1;
                    }
                }
            }
            Ok(destroyed)
        })
    }
}

/// Whether `error` says the object is gone: another process destroyed it.
fn vanished(error: &HsmError) -> bool {
    error.rv().is_some_and(is_stale_handle)
}

/// `None` for a call on an object that is gone, the outcome otherwise.
fn unless_vanished<T>(outcome: Result<T>) -> Result<Option<T>> {
    match outcome {
        Ok(value) => Ok(Some(value)),
        Err(error) if vanished(&error) => {
            tracing::debug!(%error, "an object vanished while the token was listed");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}
