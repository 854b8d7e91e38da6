//! The codec of every `custody.v1` service and client: prost's encoding,
//! except that a message which does not decode is answered
//! `INVALID_ARGUMENT` with the `ErrorInfo` reason [`UNDECODABLE`] (domain
//! [`ERROR_DOMAIN`]) and prost's description of what was wrong. tonic-prost
//! answers `INTERNAL`, which custody keeps for its own bugs: bytes that are
//! not the request's message are the sender's mistake.
//!
//! On the client side the same rule applies to a response that does not
//! decode.

use std::collections::HashMap;
use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo` domain of every custody error.
pub const ERROR_DOMAIN: &str = "custody.dev";

/// The `ErrorInfo` reason of a message that does not decode (the
/// `custody_core::Reason` of the same name).
pub const UNDECODABLE: &str = "UNDECODABLE";

/// custody's stable `ErrorInfo` reason of `status`, or "" if it carries
/// none (a transport failure, say): what clients match refusals on.
pub fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// How long `status` asks the caller to wait before trying again
/// (`google.rpc.RetryInfo`), if it says.
pub fn retry_after(status: &Status) -> Option<std::time::Duration> {
    status.get_error_details().retry_info()?.retry_delay
}

/// prost's codec, with undecodable messages refused as the sender's error.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RefusingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RefusingDecoder { _type: PhantomData }
    }
}

/// Decodes `U`, refusing bytes that are not one with `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct RefusingDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for RefusingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|error| undecodable(&error))
    }
}

/// The status of a message that does not decode.
pub fn undecodable(error: &prost::DecodeError) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        error.to_string(),
        ErrorDetails::with_error_info(UNDECODABLE, ERROR_DOMAIN, HashMap::<String, String>::new()),
    )
}
