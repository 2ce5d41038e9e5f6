//! aws-config and aws-sdk-sts as a pod uses them: the IMDS credentials provider, unmodified,
//! pointed at iamlet, and STS GetCallerIdentity to see whose credentials they are.

use aws_config::BehaviorVersion;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::provider_config::ProviderConfig;
use aws_sdk_sts::config::Region;

pub fn http_client() -> aws_sdk_sts::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let _ = rustls::crypto::ring::default_provider().install_default();
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// aws-config's own IMDS client and credentials provider for the IMDS at `imds`.
pub fn imds_provider(imds: &str) -> ImdsCredentialsProvider {
    let provider_config = ProviderConfig::without_region().with_http_client(http_client());
    let client = aws_config::imds::Client::builder()
        .configure(&provider_config)
        .endpoint(imds)
        .expect("endpoint")
        .build();
    ImdsCredentialsProvider::builder()
        .configure(&provider_config)
        .imds_client(client)
        .build()
}

/// The caller ARN STS at `sts` sees for credentials from the IMDS at `imds`, or the error.
pub async fn caller_identity(imds: &str, sts: &str) -> Result<String, String> {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client())
        .region(Region::new("us-east-1"))
        .credentials_provider(imds_provider(imds))
        .endpoint_url(sts)
        .load()
        .await;
    let identity = aws_sdk_sts::Client::new(&config)
        .get_caller_identity()
        .send()
        .await
        .map_err(|err| format!("{}", aws_sdk_sts::error::DisplayErrorContext(err)))?;
    Ok(identity.arn.unwrap_or_default())
}
