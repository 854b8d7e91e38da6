//! What the token holds: every object the logged-in user can see, with the
//! attributes drift detection compares against custody's registry.

use cryptoki::context::Function;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};

use crate::error::Result;
use crate::session::HsmSession;
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
                )?;
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
                match object.class {
                    ObjectClassName::Public => {
                        // A key of a type custody does not use has no SPKI
                        // here; drift detection reports it by label.
                        if let Ok(spec) = s.read_spec(handle, &label) {
                            object.public_key_der = s
                                .read_public_key(handle, spec, &label)
                                .ok()
                                .map(|k| k.spki_der().to_vec());
                        }
                    }
                    ObjectClassName::Secret => {
                        object.check_value = s.check_value(handle, &label).ok();
                    }
                    _ => {}
                }
                objects.push(object);
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
                    s.attributes(handle, &[AttributeType::Label, AttributeType::Id], &context)?;
                let unnamed = attributes.iter().all(|attribute| match attribute {
                    Attribute::Label(bytes) | Attribute::Id(bytes) => bytes.is_empty(),
                    _ => true,
                });
                if unnamed {
                    s.call(
                        Function::DestroyObject,
                        || "destroying an object with neither label nor id".into(),
                        |session| session.destroy_object(handle),
                    )?;
                    destroyed += 1;
                }
            }
            Ok(destroyed)
        })
    }
}
